"""The web app (app.py, utils/app/): every endpoint through gradio_client on tiny in-process models, the request
checks, model choice and loading messages, the page's offline assets; a real headless Chromium (slow tier)."""
import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image as PImage
import pytest
import torch

from models import schedules
from tests.tiny import tiny_vae_var
from utils.app import loading, requests
from utils.app.requests import ADAPTIVE, CONDEC, PER_SCALE, RequestError
from utils.model_io import Loaded
from utils.sample.config import ModelSource, SampleConfig
from utils.sample import image_io
from utils.sample.image_io import to_uint8_HWC

gr = pytest.importorskip('gradio')
from gradio_client import Client, handle_file   # noqa: E402
from gradio_client.exceptions import AppError   # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4   # tiny models: scales 1,2,3,4; 8 px images; 5 classes
PX = 8


def tiny_models():
    viar = loading.serve_model('VIAR', Loaded(*tiny_vae_var(True), None, 'tiny-viar'), SampleConfig())
    var = loading.serve_model('VAR', Loaded(*tiny_vae_var(False, seed=1), None, 'tiny-var'), SampleConfig())
    return viar, var


@pytest.fixture(scope='module')
def served():
    """The app on a tiny VIAR (and a tiny VAR to compare), launched in-process on a free port; a client of it."""
    from utils.app.ui import CSS, build_app, theme
    models = tiny_models()
    pillow_limit = PImage.MAX_IMAGE_PIXELS   # build_app lowers it for the serving process; restored below
    demo = build_app(list(models), SampleConfig(iter_left=4, iter_right=2, top_k=0, top_p=0))
    demo.queue(default_concurrency_limit=1)
    for attempt in range(3):
        # a port of our own (other test runs on this machine launch apps too); Gradio's 3-second check that the
        # server answers can miss on a loaded machine, so it gets three tries
        try:
            _, url, _ = demo.launch(prevent_thread_lock=True, theme=theme(), css=CSS, server_name='127.0.0.1',
                                    server_port=free_port(), quiet=True)
            break
        except (OSError, ValueError):
            demo.close()
            if attempt == 2:
                raise
    yield Client(url, verbose=False, download_files=True), models, url
    demo.close()
    PImage.MAX_IMAGE_PIXELS = pillow_limit


def gen_args(class_id=3, seeds='0,1,2,3', batch_size=8, cfg=1.5, top_k=0, top_p=0.0, mode=CONDEC, iter_left=4,
             iter_right=2, iters='', tau='', tau_cap=0):
    return dict(class_id=class_id, seeds=seeds, batch_size=batch_size, cfg=cfg, top_k=top_k, top_p=top_p, mode=mode,
                iter_left=iter_left, iter_right=iter_right, iters=iters, tau=tau, tau_cap=tau_cap)


def chart_iters(chart: dict, run: str = None):
    """Iterations per scale, in scale order, of one run of a BarPlot value (all runs when None)."""
    rows = [r for r in chart['data'] if run is None or r[2].startswith(run)]
    return [r[1] for r in sorted(rows, key=lambda r: r[0])]


def read_png(item) -> np.ndarray:
    return np.asarray(PImage.open(item['image']).convert('RGB'))


# ---------------------------------------------------------------- Generate

def test_generate_images_iterations_and_figures(served):
    client, (viar, _), _ = served
    images, chart, summary, kv_mib, seconds_per_image = client.predict(**gen_args(batch_size=3), api_name='/generate')
    assert len(images) == 4 and [im['caption'] for im in images] == [f'class 3 · seed {s}' for s in range(4)]
    want = schedules.decreasing(4, 2, K).counts
    assert chart_iters(chart) == want == [4, 3, 2, 2]
    assert f'iterations per scale: {", ".join(map(str, want))}' in summary and 'Dec.(4,2)' in summary
    kv = float(re.search(r'KV cache: ([\d.]+) MiB', summary).group(1))
    assert kv > 0 and re.search(r'([\d.]+) s per image', summary)
    assert kv_mib == pytest.approx(kv, abs=0.005) and seconds_per_image > 0   # the summary's figures, as numbers
    # each image is the one its (class, seed) gives alone (batch 3 splits 4 images 3 + 1), saved losslessly
    for item, seed in zip(images, range(4)):
        assert read_png(item).shape == (PX, PX, 3)
        alone = viar.var.autoregressive_infer_cfg(1, 3, g_seed=seed, cfg=1.5, top_k=0, top_p=0.0,
                                                  schedule=schedules.decreasing(4, 2, K))
        diff = np.abs(read_png(item).astype(int) - to_uint8_HWC(alone[0]).astype(int))
        assert diff.max() <= 1   # batching moves floats by ~1e-6: at most one level after rounding


def test_generate_per_scale_list_and_adaptive(served):
    client = served[0]
    _, chart, summary, *_ = client.predict(**gen_args(mode=PER_SCALE, iters='3,0,2,1'), api_name='/generate')
    assert chart_iters(chart) == [3, 0, 2, 1]
    assert 'scale 2 skips the implicit block' in summary
    # adaptive: a tau no residual reaches runs every scale to its cap; a huge tau stops after the first iteration
    _, chart, summary, *_ = client.predict(**gen_args(mode=ADAPTIVE, tau='1e-30', tau_cap=3), api_name='/generate')
    assert chart_iters(chart) == [3, 3, 3, 3] and 'Ada.(tau=1e-30;cap=3)' in summary
    _, chart, *_ = client.predict(**gen_args(mode=ADAPTIVE, tau='1e30', tau_cap=5), api_name='/generate')
    assert chart_iters(chart) == [1, 1, 1, 1]
    # tau_cap 0 is the default cap, as the page's label says
    _, chart, *_ = client.predict(**gen_args(mode=ADAPTIVE, tau='1e-30', tau_cap=0), api_name='/generate')
    assert chart_iters(chart) == [schedules.DEFAULT_CAP] * K


def test_tau_cap_says_what_0_means_on_the_page_and_in_help():
    from utils.app.ui import build_app
    from utils.sample.config import add_sample_args
    demo = build_app(list(tiny_models()), SampleConfig())
    caps = [b for b in demo.blocks.values() if str(getattr(b, 'elem_id', '')).endswith('tau_cap')]
    assert len(caps) == 4    # Generate, Compare A and B, Edit
    for b in caps:
        assert b.label == f'tau_cap (0 = {schedules.DEFAULT_CAP})' and f'0 = the default cap, {schedules.DEFAULT_CAP}' in b.info
    parser = argparse.ArgumentParser()
    add_sample_args(parser)
    text = ' '.join(next(a for a in parser._actions if a.dest == 'tau_cap').help.split())
    assert f'0 (the default): {schedules.DEFAULT_CAP}' in text and 'max(iter_left, iter_right)' in text


API = {   # endpoint -> (parameter names, return names) as gradio_client shows them
    '/generate': (['class_id', 'seeds', 'batch_size', 'cfg', 'top_k', 'top_p', 'mode', 'iter_left', 'iter_right',
                   'iters', 'tau', 'tau_cap'], ['images', 'iterations', 'summary', 'kv_mib', 'seconds_per_image']),
    '/compare': (['what', 'class_id', 'seeds', 'cfg', 'top_k', 'top_p'] + [f'{ab}_{k}' for ab in 'ab' for k in (
        'mode', 'iter_left', 'iter_right', 'iters', 'tau', 'tau_cap')],
        ['images_a', 'summary_a', 'images_b', 'summary_b', 'iterations', 'kv_mib_a', 'seconds_per_image_a',
         'kv_mib_b', 'seconds_per_image_b']),
    '/edit': (['image', 'box', 'edit_mode', 'class_id', 'seeds', 'cfg', 'top_k', 'top_p', 'mode', 'iter_left',
               'iter_right', 'iters', 'tau', 'tau_cap'], ['inputs', 'edited', 'summary', 'kv_mib', 'seconds_per_image']),
}


def test_every_input_and_output_has_a_readable_api_name(served):
    """What `client.view_api()` shows: each parameter and each return named (no `value_34`), as docs/APP.md lists."""
    from gradio_client.utils import sanitize_parameter_names
    info = served[0].view_api(print_info=False, return_format='dict')['named_endpoints']
    assert set(info) == set(API)
    for endpoint, (params, returns) in API.items():
        assert [p['parameter_name'] for p in info[endpoint]['parameters']] == params, endpoint
        assert [sanitize_parameter_names(r['label']) for r in info[endpoint]['returns']] == returns, endpoint
    doc = open(os.path.join(ROOT, 'docs', 'APP.md')).read()
    for endpoint, (_, returns) in API.items():
        row = next(ln for ln in doc.splitlines() if ln.startswith(f'| `{endpoint}` |'))
        assert re.findall(r'`(\w+)`', row) == returns, endpoint


def test_the_python_block_of_docs_app_md_runs_against_the_app(served, capsys):
    """docs/APP.md's "Calling it from Python" block, as written, against the test app's address."""
    doc = open(os.path.join(ROOT, 'docs', 'APP.md')).read()
    block = doc.split('## Calling it from Python', 1)[1].split('```python\n', 1)[1].split('```', 1)[0]
    assert "Client('http://127.0.0.1:7860/'" in block
    exec(compile(block.replace('http://127.0.0.1:7860/', served[2]), 'docs/APP.md', 'exec'), {})
    out = capsys.readouterr().out
    assert "['class 3 · seed 0', 'class 3 · seed 1', 'class 3 · seed 2', 'class 3 · seed 3']" in out
    assert 'iterations per scale: [4.0, 3.0, 2.0, 2.0]' in out and re.search(r'KV cache [\d.]+ MiB', out)
    adaptive = json.loads(re.search(r'adaptive: (\[.*\])', out).group(1))
    assert len(adaptive) == K and all(1 <= n <= 8 for n in adaptive)


BAD_REQUESTS = [
    (dict(class_id=5), 'out of range: this model has 5 classes'),
    (dict(class_id=-1), 'out of range'),
    (dict(class_id='cat'), 'class must be a whole number'),
    (dict(mode=ADAPTIVE, tau='0'), 'tau must be > 0'),
    (dict(mode=ADAPTIVE, tau='-1'), 'tau must be > 0'),
    (dict(mode=ADAPTIVE, tau=''), 'tau: give a residual'),
    (dict(mode=ADAPTIVE, tau='0.1,0.2'), 'need one tau per scale (4), got 2'),
    (dict(mode=PER_SCALE, iters='4,4'), 'needs 4 counts'),
    (dict(mode=PER_SCALE, iters='4,x,4,4'), 'comma-separated integers'),
    (dict(iter_left=-1), 'iter_left/--iter_right must be >= 0'),
    (dict(iter_left=2.5), 'iter_left must be a whole number'),
    (dict(cfg=-0.5), '--cfg must be >= 0'),
    (dict(top_p=1.5), '--top_p must be in [0, 1]'),
    (dict(top_k=49), 'exceeds the vocabulary (48 tokens)'),
    (dict(seeds='0,a'), 'seeds must be whole numbers'),
    (dict(seeds=''), 'at least one seed'),
    (dict(seeds='0-100'), 'at most 64 images'),
    (dict(batch_size=0), 'batch size must be >= 1'),
]


@pytest.mark.parametrize('change, message', BAD_REQUESTS)
def test_bad_request_values_say_what_to_change(change, message):
    """Every check of a Generate request, without the web (the client test below sends a few through it)."""
    viar, _ = tiny_models()
    a = gen_args(**change)
    with pytest.raises(RequestError, match=re.escape(message)):
        config = requests.sample_config(a['cfg'], a['top_k'], a['top_p'], requests.ScheduleRequest(
            a['mode'], a['iter_left'], a['iter_right'], a['iters'], a['tau'], a['tau_cap']), K)
        requests.generate(viar, a['class_id'], a['seeds'], config, a['batch_size'])


@pytest.mark.parametrize('change, message', [BAD_REQUESTS[i] for i in (0, 3, 7, 11, 14)] + [
    (dict(mode='fast'), 'is not in the list of choices'),   # Gradio's own check of a radio button
])
def test_generate_bad_value_returns_the_message(served, change, message):
    with pytest.raises(AppError) as e:
        served[0].predict(**gen_args(**change), api_name='/generate')
    assert message in str(e.value) and 'Traceback' not in str(e.value)


def test_a_request_reports_progress_per_batch():
    viar, _ = tiny_models()
    seen = []
    config = requests.sample_config(1.5, 0, 0, requests.ScheduleRequest(CONDEC, 2, 2), K)
    r = requests.generate(viar, 1, '0-4', config, batch_size=2, progress=lambda f, text: seen.append((f, text)))
    assert [f for f, _ in seen] == [0.4, 0.8, 1.0] and seen[-1][1].endswith('5/5 images')
    assert r.images_N3HW.shape == (5, 3, PX, PX) and r.iters == [2, 2, 2, 2]


# ---------------------------------------------------------------- Compare

def compare_args(what='two schedules', a=(CONDEC, 4, 4, '', '', 0), b=(CONDEC, 1, 1, '', '', 0)):
    keys = ('mode', 'iter_left', 'iter_right', 'iters', 'tau', 'tau_cap')
    return dict(what=what, class_id=2, seeds='5,6', cfg=1.5, top_k=0, top_p=0.0,
                **{f'a_{k}': v for k, v in zip(keys, a)}, **{f'b_{k}': v for k, v in zip(keys, b)})


def test_compare_two_schedules_same_seeds(served):
    images_a, text_a, images_b, text_b, chart, kv_a, _, kv_b, _ = served[0].predict(**compare_args(),
                                                                                    api_name='/compare')
    assert len(images_a) == len(images_b) == 2
    captions = ['class 2 · seed 5', 'class 2 · seed 6']
    assert [i['caption'] for i in images_a] == [i['caption'] for i in images_b] == captions
    assert chart_iters(chart, 'A') == [4, 4, 4, 4] and chart_iters(chart, 'B') == [1, 1, 1, 1]
    assert 'Con.(4,4)' in text_a and 'Con.(1,1)' in text_b
    # more iterations keep more implicit-block KV entries (one per iteration index)
    kv = [float(re.search(r'KV cache: ([\d.]+) MiB', t).group(1)) for t in (text_a, text_b)]
    assert kv[0] > kv[1] and kv_a == pytest.approx(kv[0], abs=0.005) and kv_b == pytest.approx(kv[1], abs=0.005)


def test_compare_viar_beside_var(served):
    images_a, text_a, images_b, text_b, chart, *_ = served[0].predict(
        **compare_args('the two models', b=(PER_SCALE, 0, 0, '9,9,9,9', '', 0)), api_name='/compare')
    assert len(images_a) == len(images_b) == 2
    assert chart_iters(chart, 'A') == [4, 4, 4, 4] and chart_iters(chart, 'B') == []   # a VAR has no implicit block
    assert 'VAR depth 4' not in text_a and 'no implicit block' in text_b
    assert 'iterations per scale' not in text_b


def test_compare_bad_schedule_b_returns_the_message(served):
    with pytest.raises(AppError, match='needs 4 counts'):
        served[0].predict(**compare_args(b=(PER_SCALE, 0, 0, '1,2,3', '', 0)), api_name='/compare')


# ---------------------------------------------------------------- Edit

def edit_args(image, layers=(), box='', edit_mode='inpaint', class_id=1, seeds='0,1', **sched):
    value = dict(background=handle_file(image), layers=[handle_file(p) for p in layers], composite=None, id=None)
    s = dict(mode=CONDEC, iter_left=3, iter_right=3, iters='', tau='', tau_cap=0, **sched)
    return dict(image=value, box=box, edit_mode=edit_mode, class_id=class_id, seeds=seeds, cfg=1.5, top_k=0,
                top_p=0.0, **s)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / 'pic.png'
    PImage.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def white_fraction(item) -> float:
    return float((read_png(item)[..., 0] > 127).mean())


def test_edit_with_a_box_inpaint_and_outpaint(served, picture):
    client = served[0]
    shown, edited, summary, *_ = client.predict(**edit_args(picture, box='0,0,0.5,0.5'), api_name='/edit')
    assert [s['caption'] for s in shown] == ['input', 'mask', 'reconstruction']
    assert all(read_png(s).shape == (PX, PX, 3) for s in shown + edited) and len(edited) == 2
    assert white_fraction(shown[1]) == 0.25 and 'iterations per scale: 3, 3, 3, 3' in summary
    shown, *_ = client.predict(**edit_args(picture, box='0,0,0.5,0.5', edit_mode='outpaint'), api_name='/edit')
    assert white_fraction(shown[1]) == 0.75


def test_edit_to_another_class_changes_the_regenerated_region(served, picture):
    """Class-conditional editing: the same image, box and seeds edited to two classes give other pixels, and the
    same class twice gives the same ones."""
    client = served[0]
    runs = [client.predict(**edit_args(picture, box='0,0,1,0.5', class_id=c), api_name='/edit')[1] for c in (1, 3, 1)]
    a, b, again = ([read_png(e) for e in edited] for edited in runs)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_edit_with_a_drawn_mask(served, picture, tmp_path):
    layer = np.zeros((24, 24, 4), np.uint8)
    layer[0:12, 12:24] = 255   # the top-right quarter drawn in white, the rest transparent
    PImage.fromarray(layer).save(tmp_path / 'layer.png')
    shown, edited, *_ = served[0].predict(**edit_args(picture, [str(tmp_path / 'layer.png')]), api_name='/edit')
    mask = read_png(shown[1])[..., 0] > 127
    assert mask[:4, 4:].all() and not mask[4:].any() and not mask[:, :4].any()
    assert len(edited) == 2


@pytest.mark.parametrize('change, message', [
    (dict(box='0.6,0,0.5,1'), 'box fractions need'),
    (dict(box='1,2'), 'four fractions'),
    (dict(), 'draw the region to regenerate'),
    (dict(class_id=7), 'edit class [7] out of range'),
])
def test_edit_bad_value_returns_the_message(served, picture, change, message):
    with pytest.raises(AppError) as e:
        served[0].predict(**edit_args(picture, **change), api_name='/edit')
    assert message in str(e.value) and 'Traceback' not in str(e.value)


def test_edit_mask_of_another_size_says_so(served, picture, tmp_path):
    PImage.fromarray(np.full((10, 10, 4), 255, np.uint8)).save(tmp_path / 'small.png')
    with pytest.raises(AppError, match='draw the mask at the image size'):
        served[0].predict(**edit_args(picture, [str(tmp_path / 'small.png')]), api_name='/edit')


def test_edit_image_over_the_upload_limit_says_so(served, tmp_path):
    side = image_io.MAX_IMAGE_SIDE + 1
    PImage.new('RGB', (side, 8)).save(tmp_path / 'wide.png')
    with pytest.raises(AppError, match=f'images up to {image_io.MAX_IMAGE_SIDE}x{image_io.MAX_IMAGE_SIDE}'):
        served[0].predict(**edit_args(str(tmp_path / 'wide.png'), box='0,0,1,1'), api_name='/edit')


def test_the_served_process_never_decodes_an_image_over_the_pixel_limit(served, tmp_path):
    """Gradio decodes an upload before the app's own checks: in a process that built the app, Pillow refuses, on
    the header, any image of more than MAX_IMAGE_SIDE**2 pixels (an image at the limit still opens)."""
    side = image_io.MAX_IMAGE_SIDE
    PImage.new('1', (side, side)).save(tmp_path / 'at.png')
    PImage.new('1', (side + 1, side)).save(tmp_path / 'over.png')
    assert PImage.open(tmp_path / 'at.png').size == (side, side)
    with pytest.raises(PImage.DecompressionBombError):
        PImage.open(tmp_path / 'over.png')


# ---------------------------------------------------------------- the page: offline assets, no model

def test_page_loads_nothing_from_outside(served):
    import httpx
    _, _, url = served
    html = httpx.get(url, timeout=30).text
    external = re.findall(r'(?:src|href)=["\'](https?://[^"\']+)', html)
    assert external == [], external
    config = httpx.get(url.rstrip('/') + '/config', timeout=30).json()
    assert config.get('analytics_enabled') is False
    css = str(config.get('theme_css', '')) + str(config.get('stylesheets', ''))
    assert 'googleapis' not in css and 'fonts.gstatic' not in css
    assert os.environ.get('GRADIO_ANALYTICS_ENABLED') == 'False'


def test_theme_uses_system_fonts_only():
    from utils.app.ui import theme
    t = theme()
    assert t._stylesheets == [] and 'ui-sans-serif' in t.font and 'ui-monospace' in t.font_mono


def test_no_model_says_how_to_get_weights(tmp_path, capsys):
    import app
    demo, args = app.make_app(['--demo_dir', str(tmp_path / 'nothing')])
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert any('bash scripts/demo.sh' in str(t) and '--var_ckpt viar.pth' in str(t) for t in texts)
    assert 'bash scripts/demo.sh' in capsys.readouterr().out
    assert args.share is False and args.host == '127.0.0.1'


def test_a_model_that_fails_to_load_says_why(tmp_path):
    bad = tmp_path / 'broken.pth'
    bad.write_bytes(b'not a checkpoint')
    sources = [('model', ModelSource(var_ckpt=str(bad), device='cpu'))]
    models, errors = loading.load_app_models(sources, SampleConfig())
    assert models == [] and len(errors) == 1 and str(bad) in errors[0] and 'cannot load' in errors[0]
    from utils.app.ui import build_app
    demo = build_app(models, errors=errors)
    assert any('Model failed to load' in str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown))


def test_app_serves_a_checkpoint_from_the_command_line(tmp_path):
    """app.py --var_ckpt PATH (a slim export) and --compare_ckpt: both load, the page serves them by kind."""
    from utils.model_io import slim_export
    from tests.tiny import tiny_spec
    import app
    torch.manual_seed(0)
    for name, s in (('viar', tiny_spec(True)), ('var', tiny_spec(False))):
        vae, var = s.build('cpu')
        torch.save(slim_export(var, s, vae=vae), tmp_path / f'{name}.pth')
    demo, _ = app.make_app(['--var_ckpt', str(tmp_path / 'viar.pth'), '--compare_ckpt', str(tmp_path / 'var.pth'),
                            '--device', 'cpu'])
    serving = [str(b.value) for b in demo.blocks.values() if getattr(b, 'elem_id', None) == 'serving']
    assert serving and 'VIAR (viar)' in serving[0] and 'VAR (var)' in serving[0]


# ---------------------------------------------------------------- pure parts

def test_app_sources_rule(tmp_path):
    for rel in ('viar/viar-slim.pth', 'var/var-slim.pth'):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b'')
    demo = loading.app_sources(ModelSource(), str(tmp_path))
    assert [n for n, _ in demo] == ['VIAR', 'VAR'] and demo[0][1].var_ckpt.endswith('viar/viar-slim.pth')
    given = loading.app_sources(ModelSource(var_ckpt='x.pth'), str(tmp_path), compare_ckpt='y.pth')
    assert [(n, s.var_ckpt) for n, s in given] == [('model', 'x.pth'), ('compare', 'y.pth')]
    assert loading.app_sources(ModelSource(), str(tmp_path / 'none')) == []
    with pytest.raises(SystemExit, match='--compare_ckpt needs --var_ckpt'):
        loading.app_sources(ModelSource(), str(tmp_path / 'none'), compare_ckpt='y.pth')


def test_demo_defaults_come_from_results_json(tmp_path):
    (tmp_path / 'results.json').write_text('{"sample": {"cfg": 2.0, "top_k": 0, "top_p": 0, "iter_left": 4, '
                                           '"iter_right": 3, "seeds_per_class": 10}}')
    assert loading.demo_sample_defaults(str(tmp_path)) == dict(cfg=2.0, top_k=0, top_p=0, iter_left=4, iter_right=3)
    (tmp_path / 'results.json').write_text('{broken')
    assert loading.demo_sample_defaults(str(tmp_path)) == {}
    viar, _ = tiny_models()
    assert loading.page_sample_defaults([viar]).top_k == 0   # 900 > a 48-token vocabulary: no filtering


def test_class_names():
    names = loading.class_names(1000)
    assert len(names) == 1000 and names[207] == 'golden retriever' and names[0] == 'tench'
    assert loading.class_names(10)[3] == 'digit 3' and loading.class_names(5) == [f'class {i}' for i in range(5)]


def test_parse_seeds():
    assert requests.parse_seeds('0,1,2,3') == [0, 1, 2, 3]
    assert requests.parse_seeds(' 4-6, 10') == [4, 5, 6, 10]
    for bad in ('3-1', '1,1', 'x', '-2'):
        with pytest.raises(RequestError):
            requests.parse_seeds(bad)


def test_sample_config_sets_only_the_modes_fields():
    c = requests.sample_config(1.5, 0, 0, requests.ScheduleRequest(ADAPTIVE, 9, 9, '', '0.01', 0), K)
    assert c.schedule(K).adaptive and c.schedule(K).counts == [schedules.DEFAULT_CAP] * K and 'iter_left' not in c.typed
    c = requests.sample_config(1.5, 0, 0, requests.ScheduleRequest(PER_SCALE, 9, 9, '1,2,3,4', '0.01', 7), K)
    assert c.schedule(K).counts == [1, 2, 3, 4] and not c.schedule(K).adaptive
    base = SampleConfig(dtype='bf16')
    assert requests.sample_config(1.5, 0, 0, requests.ScheduleRequest(), K, base).dtype == 'bf16'


def test_server_sampling_flags_reach_the_sampler():
    """--dtype / --fast are server-wide: every served model's sampler runs with them, every request keeps them."""
    m = loading.serve_model('VIAR', Loaded(*tiny_vae_var(True), None, 'tiny'), SampleConfig(fast=True, dtype='fp32'))
    assert m.sampler.fast is True and m.sampler.dtype == 'fp32'
    config = requests.sample_config(1.5, 0, 0, requests.ScheduleRequest(), K, SampleConfig(fast=True))
    assert config.fast is True


def test_app_flags():
    import app
    p = app.build_parser()
    ns = p.parse_args([])
    assert (ns.port, ns.host, ns.share, ns.demo_dir, ns.compare_ckpt) == (7860, '127.0.0.1', False, 'demo_output', '')
    flags = {o for a in p._actions for o in a.option_strings}
    assert {'--var_ckpt', '--vae_ckpt', '--use_implicit', '--depth', '--device', '--dtype', '--compile'} <= flags
    assert not {'--cfg', '--iter_left', '--tau'} & flags   # the page's controls, not server flags


# ---------------------------------------------------------------- a real browser (slow)

TINY_FLAGS = ['--var_ckpt', 'random', '--depth', '4', '--use_implicit', 'True', '--pre_depth', '1', '--post_depth',
              '1', '--width', '32', '--heads', '2', '--patch_nums', '1,2,3,4', '--V', '48', '--Cvae', '8', '--vae_ch',
              '32', '--vae_ch_mult', '1,1', '--vae_num_res_blocks', '1', '--num_classes', '5', '--device', 'cpu']
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
needs_chromium = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                    reason='no chromium / chromedriver: SETUP_SYSTEM_PACKAGES=1 bash scripts/setup.sh installs them')


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(port: int, extra, prefix=()) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False', OMP_NUM_THREADS='1')
    return subprocess.Popen([*prefix, sys.executable, 'app.py', '--port', str(port), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def wait_for_server(proc, url: str, timeout: float = 120):
    import time
    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f'app.py exited {proc.returncode}:\n{proc.stdout.read()}')
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f'app.py did not answer at {url} within {timeout} s')


def stop(proc):
    import signal
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def chrome_flags(user_dir: str):
    return ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
            '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
            '--disable-default-apps', '--disable-extensions', '--window-size=1400,1700',
            f'--user-data-dir={user_dir}']


@pytest.mark.slow
@needs_chromium
def test_browser_generate_changes_schedule_and_charts_it(tmp_path):
    """Headless Chromium (Selenium on Debian's chromedriver, Selenium Manager offline): open the page, switch the
    schedule to a per-scale list, Generate, wait for the images, read the iterations back, save a screenshot;
    then edit an uploaded image with a painted mask.

    VIAR_APP_DEMO_DIR serves that demo folder instead of a tiny random model; VIAR_APP_SCREENSHOT saves the
    screenshot there too (docs/app_screenshot.png was made this way)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    os.environ['SE_OFFLINE'] = 'true'   # Selenium Manager never downloads a driver or a browser
    demo_dir = os.environ.get('VIAR_APP_DEMO_DIR')
    extra = ['--demo_dir', demo_dir, '--device', 'cpu'] if demo_dir else TINY_FLAGS
    counts = '5,0,3,1'
    port = free_port()
    url = f'http://127.0.0.1:{port}/'
    proc = start_server(port, extra)
    driver = None
    try:
        wait_for_server(proc, url)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for f in chrome_flags(str(tmp_path / 'chrome')):
            opts.add_argument(f)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(EC.element_to_be_clickable((By.ID, 'generate')))
        # the schedule: a per-scale list instead of Con./Dec.
        driver.find_element(By.XPATH, f"//*[@id='gen_mode']//label[contains(., '{PER_SCALE}')]").click()
        box = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '#gen_iters textarea, #gen_iters input')))
        box.clear()
        box.send_keys(counts)
        driver.find_element(By.ID, 'generate').click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#gen_images img')) >= 4)
        wait.until(lambda d: 'iterations per scale' in d.find_element(By.ID, 'gen_summary').text)
        summary = driver.find_element(By.ID, 'gen_summary').text
        assert f'iterations per scale: {counts.replace(",", ", ")}' in summary, summary
        assert f'Iters({counts})' in summary and 'scale 2 skips the implicit block' in summary
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#gen_chart canvas, #gen_chart svg'))
        images = driver.find_elements(By.CSS_SELECTOR, '#gen_images img')
        assert all(driver.execute_script('return arguments[0].complete && arguments[0].naturalWidth', im) > 0
                   for im in images)
        # everything the page fetched came from the app itself: no CDN, no web font
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        outside = [u for u in fetched if not u.startswith(url.rstrip('/')) and not u.startswith(('data:', 'blob:'))]
        assert outside == [], outside
        driver.save_screenshot(str(tmp_path / 'app.png'))
        assert PImage.open(tmp_path / 'app.png').size[0] > 0
        if os.environ.get('VIAR_APP_SCREENSHOT'):
            shutil.copy(tmp_path / 'app.png', os.environ['VIAR_APP_SCREENSHOT'])
        browser_edit(driver, wait, tmp_path)
    finally:
        if driver is not None:
            driver.quit()
        stop(proc)


def browser_edit(driver, wait, tmp_path):
    """The Edit tab in the browser: upload an image, paint a stroke with the white brush, Edit; the mask the app
    used is the painted region (not empty, not everything), so a drawn layer reaches the editing code."""
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    PImage.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / 'in.png')
    driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Edit')]").click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#edit_image input[type=file]'))
    upload.send_keys(str(tmp_path / 'in.png'))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#edit_image canvas'))
    brush = driver.find_element(By.CSS_SELECTOR, "#edit_image button[aria-label='Brush']")
    driver.execute_script('arguments[0].click()', brush)   # the toolbar button sits under an overlay
    canvas = driver.find_elements(By.CSS_SELECTOR, '#edit_image canvas')[-1]
    ActionChains(driver).move_to_element_with_offset(canvas, -100, -60).click_and_hold().move_by_offset(60, 0) \
        .move_by_offset(0, 40).move_by_offset(-60, 0).release().perform()
    driver.find_element(By.ID, 'edit').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#edit_inputs img')) >= 3)
    src = driver.find_elements(By.CSS_SELECTOR, '#edit_inputs img')[1].get_attribute('src')
    mask = np.asarray(PImage.open(io.BytesIO(httpx.get(src, timeout=30).content)).convert('L')) > 127
    assert 0 < mask.mean() < 1, mask.mean()
    driver.save_screenshot(str(tmp_path / 'app_edit.png'))


def _can_unshare() -> bool:
    try:
        return subprocess.run(['unshare', '-n', 'true'], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@needs_chromium
def test_page_renders_with_the_network_unreachable(tmp_path):
    """Server and browser in a network namespace with only loopback (`unshare -n`): the page still renders (no CDN,
    no web font, no analytics call the page would wait for). Where namespaces are not allowed, the browser alone
    is cut off from every host but the app's (Chromium's host resolver rules)."""
    port = free_port()
    url = f'http://127.0.0.1:{port}/'
    py = sys.executable
    chrome = [CHROMIUM, *chrome_flags(str(tmp_path / 'chrome')), '--virtual-time-budget=20000', '--dump-dom', url]
    if _can_unshare():
        wait = f"{py} -c \"import urllib.request as u; u.urlopen('{url}')\" 2>/dev/null"
        script = '\n'.join([
            'ip link set lo up',
            f'{py} app.py --port {port} {" ".join(TINY_FLAGS)} > {tmp_path}/server.log 2>&1 &',
            'srv=$!', 'trap "kill $srv" EXIT',
            f'for i in $(seq 240); do {wait} && break; sleep 0.5; done',
            ' '.join(f"'{a}'" for a in chrome)])
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False')
        out = subprocess.run(['unshare', '-n', 'bash', '-c', script], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=env, start_new_session=True)
        dom = out.stdout
    else:
        proc = start_server(port, TINY_FLAGS)
        try:
            wait_for_server(proc, url)
            rules = '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1'
            dom = subprocess.run(chrome[:1] + [rules] + chrome[1:], capture_output=True, text=True, timeout=120).stdout
        finally:
            stop(proc)
    assert 'id="generate"' in dom and 'Generate' in dom and 'VIAR' in dom, dom[-2000:]
