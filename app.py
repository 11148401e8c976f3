"""A web app for the iteration knob and zero-shot editing: Generate, Compare, Edit (docs/APP.md).

    python app.py                                     # the demo's VIAR and VAR (after `bash scripts/demo.sh`)
    python app.py --var_ckpt viar.pth --use_implicit True --compare_ckpt var_d30.pth --device cuda
    python app.py --port 7861 --host 0.0.0.0          # on a network (--share for a public link, off by default)

Models: --var_ckpt (with gen_img.py's model flags), else the demo's checkpoints in --demo_dir (utils/app/loading.py).
Nothing else is fetched at run time: analytics off, a theme on system fonts (utils/app/ui.py).
"""
import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

from utils import cli
from utils.app import loading
from utils.cli import flag
from utils.logging_util import get_logger
from utils.sample.config import add_model_source_args, add_sample_args, parse

log = get_logger('app')


@dataclass
class AppArgs:
    """The server: where it listens and which extra models it serves."""
    port: int = flag(7860, 'port to listen on')
    host: str = flag('127.0.0.1', 'address to listen on (0.0.0.0: every interface)')
    share: bool = flag(False, "a public gradio.live link (off: nothing leaves this machine)")
    demo_dir: str = flag('demo_output', "the demo's output folder, served when --var_ckpt is not given")
    compare_ckpt: str = flag('', 'a second transformer checkpoint for Compare (VIAR beside VAR); '
                                 'the demo serves both of its models without it')
    max_file_mb: int = flag(20, 'largest upload in MB (Edit)')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='VIAR web app: the iteration knob and zero-shot editing',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_dataclass_args(p, AppArgs, 'server')
    add_model_source_args(p, defaults=dict(depth=30))
    add_sample_args(p, only=loading.SERVER_FLAGS)   # server-wide; every other sampling value is a page control
    return p


def make_app(argv: Optional[Sequence[str]] = None):
    """(gr.Blocks, AppArgs) for a command line: models loaded, the page built, not yet launched."""
    ns, source, sample = parse(build_parser(), argv)
    args = cli.from_namespace(AppArgs, ns)
    from utils.app.ui import build_app   # Gradio: seconds to import, and only the server needs it
    sources = loading.app_sources(source, args.demo_dir, args.compare_ckpt)
    models, errors = loading.load_app_models(sources, sample, log=log.warning)
    fatal = loading.fatal_load_error(bool(source.var_ckpt), models, errors)
    if fatal:
        raise SystemExit(fatal)
    for line in errors:
        log.error(line)
    if not sources:
        log.warning(loading.HOW_TO_GET_WEIGHTS)
    demo_defaults = loading.demo_sample_defaults(args.demo_dir) if not source.var_ckpt else {}
    defaults = loading.page_sample_defaults(models, demo_defaults)
    for m in models:
        log.info(f'serving {m.describe()}')
    return build_app(models, defaults, errors, base=sample), args


def main(argv: Optional[Sequence[str]] = None):
    demo, args = make_app(argv)
    from utils.app.ui import CSS, theme   # imported by make_app already
    demo.queue(default_concurrency_limit=1, max_size=32)
    log.info(f'open http://{args.host}:{args.port} (Ctrl+C stops; --share for a public link)')
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme(), css=CSS,
                max_file_size=f'{args.max_file_mb}mb', show_error=True, quiet=not args.share)


if __name__ == '__main__':
    main()
