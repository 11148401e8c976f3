"""How fast the web app answers a Generate: in-process (`utils.app.requests.generate`) and through the HTTP API
(`gradio_client` against the app launched in this process), side by side in one run, once warm.

    python bench/app_speed.py --demo_dir demo_output                 # the demo's VIAR, the page's default schedule
    python bench/app_speed.py --demo_dir demo_output --images 4 --repeats 10 --json out.json

Prints the machine (CPU, SIMD flags, load average before and after) and, per path, the median and best seconds of
a Generate of `--images` images; the ratio of the two medians is the app's own overhead (queue, PNG encoding,
HTTP). Never asserted: timings on a shared machine move with its load.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')


def seconds(fn) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--demo_dir', default='demo_output', help="the demo's output folder (its VIAR is timed)")
    p.add_argument('--images', type=int, default=4, help='images per Generate')
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    p.add_argument('--knob', default='', help="iter_left,iter_right instead of the page's default, e.g. 4,4")
    p.add_argument('--json', default='', help='also write the figures here')
    args = p.parse_args(argv)
    import torch
    from bench.sample_speed import machine_facts as machine
    from utils.app import loading, requests
    from utils.app.ui import CSS, build_app, theme
    from utils.sample.config import ModelSource, SampleConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    before = machine()
    sources = loading.app_sources(ModelSource(device="cpu"), args.demo_dir)
    if not sources:
        raise SystemExit(f'error: no demo checkpoints in {args.demo_dir}; run `bash scripts/demo.sh` first.')
    models, errors = loading.load_app_models(sources[:1], SampleConfig())
    if errors:
        raise SystemExit('error: ' + errors[0])
    model = models[0]
    d = loading.page_sample_defaults(models, loading.demo_sample_defaults(args.demo_dir))
    if args.knob:
        left, right = (int(v) for v in args.knob.split(','))
        d = dataclasses.replace(d, iter_left=left, iter_right=right)
    seeds = f'0-{args.images - 1}'
    sched = requests.ScheduleRequest(requests.CONDEC, d.iter_left, d.iter_right)
    config = requests.sample_config(d.cfg, d.top_k, d.top_p, sched, model.num_scales)
    schedule = config.schedule(model.num_scales).describe()

    def in_process():
        requests.generate(model, 0, seeds, config, batch_size=8)

    demo = build_app(models, d)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, theme=theme(), css=CSS, quiet=True)
    from gradio_client import Client
    client = Client(url, verbose=False)
    kw = dict(class_id=0, seeds=seeds, batch_size=8, cfg=d.cfg, top_k=d.top_k, top_p=d.top_p, mode=requests.CONDEC,
              iter_left=d.iter_left, iter_right=d.iter_right, iters='', tau='', tau_cap=0)

    def through_client():
        client.predict(**kw, api_name='/generate')
    in_process(), through_client()   # warm-up
    t_in, t_client = [], []
    for _ in range(args.repeats):   # interleaved, so a change of the machine's load hits both alike
        t_in.append(seconds(in_process))
        t_client.append(seconds(through_client))
    demo.close()
    after = machine()

    report = dict(machine=before, load_avg_after=after['load_avg'], threads=torch.get_num_threads(),
                  model=model.describe(), images=args.images, schedule=schedule,
                  sample=dict(cfg=d.cfg, top_k=d.top_k, top_p=d.top_p), repeats=args.repeats,
                  in_process_s=dict(median=statistics.median(t_in), best=min(t_in)),
                  client_s=dict(median=statistics.median(t_client), best=min(t_client)))
    report['client_over_in_process'] = report['client_s']['median'] / report['in_process_s']['median']
    m = before
    print(f"machine: {m['cpu']}; avx2 {m['avx2']}, avx512_bf16 {m['avx512_bf16']}, amx {m['amx']}; "
          f"torch threads {report['threads']}; load average {m['load_avg'][0]:.2f} before, "
          f"{after['load_avg'][0]:.2f} after")
    print(f'{model.describe()}; {args.images} images, cfg {d.cfg:g}, top-k {d.top_k}, top-p {d.top_p:g}, {schedule}')
    for name, key in (('in-process', 'in_process_s'), ('through gradio_client', 'client_s')):
        print(f"{name:>22}: median {report[key]['median']:.3f} s, best {report[key]['best']:.3f} s "
              f"over {args.repeats} warm calls")
    print(f"client / in-process (medians): {report['client_over_in_process']:.2f}")
    if args.json:
        from utils.atomic import write_json_atomic
        write_json_atomic(report, args.json)
    return report


if __name__ == '__main__':
    main()
