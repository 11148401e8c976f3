"""Write a Hugging Face Hub folder (models/hub.py) from any checkpoint the loaders accept; optionally upload it.

    .venv/bin/python scripts/export_hf.py demo_output/viar/viar-slim.pth hf/viar-demo
    .venv/bin/python scripts/export_hf.py local_output/ar-ckpt-last.pth hf/my-viar --ema
    .venv/bin/python scripts/export_hf.py viar.pth hf/viar --vae_ckpt vae_ch160v4096z32.pth --push_to_hub me/viar

OUT is written under a temporary name and renamed into place; it samples the same images as the checkpoint.
"""
import argparse
import os
import secrets
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__' and ROOT not in sys.path:   # run as a script: make the project importable
    sys.path.insert(0, ROOT)

from models.hub import hub_model   # noqa: E402
from utils.atomic import check_writable   # noqa: E402
from utils.checkpoint import CheckpointError   # noqa: E402
from utils.model_io import load_or_build   # noqa: E402
from utils.sample.config import ModelSource   # noqa: E402


def check_output(out: str, overwrite: bool):
    """A one-line SystemExit for an output that must not or cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f'error: {out} is a file; pass a folder to write the model into.')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SystemExit(f'error: {out} exists and is not empty; pass --overwrite to replace it, or another folder.')
    check_writable(os.path.dirname(os.path.abspath(out)))


def write_folder(model, out: str):
    """save_pretrained into a new folder beside `out`, then swap it in (the old folder goes only after the swap)."""
    parent, name = os.path.split(os.path.abspath(out))
    tmp, old = (os.path.join(parent, f'.{name}.{secrets.token_hex(4)}.{what}') for what in ('tmp', 'old'))
    os.makedirs(tmp)
    try:
        model.save_pretrained(tmp, model_card_kwargs={'name': out})
        if os.path.isdir(out):
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description='Write a Hub folder (VARHF layout and a model card) from a checkpoint.')
    p.add_argument('ckpt', help='slim export (.pth / .safetensors), ar-ckpt-*.pth, official file or Hub folder')
    p.add_argument('out', help='the folder to write')
    p.add_argument('--vae_ckpt', default='', help='tokenizer file, for checkpoints that neither embed nor record one')
    p.add_argument('--ema', action='store_true', help="export a training checkpoint's EMA weights")
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty output folder')
    p.add_argument('--push_to_hub', default='', metavar='REPO', help='also upload the folder to this Hub repo id')
    a = p.parse_args(argv)
    try:
        check_output(a.out, a.overwrite)
        loaded = load_or_build(ModelSource(var_ckpt=a.ckpt, vae_ckpt=a.vae_ckpt, ema=a.ema), 'cpu')
        model = hub_model(loaded.vae, loaded.var, loaded.spec, loaded.sample_defaults, loaded.class_names)
        write_folder(model, a.out)
    except (CheckpointError, OSError) as e:   # utils.atomic.WriteError is an OSError with a one-line message
        raise SystemExit(f'error: {e}') from None
    print(f'wrote {a.out}: {loaded.spec.kind}, sample it with .venv/bin/python gen_img.py --var_ckpt {a.out}')
    if a.push_to_hub:
        print(f'uploaded: {model.push_to_hub(a.push_to_hub)}')


if __name__ == '__main__':
    main()
