"""Train the multi-scale residual VQVAE tokenizer on an image folder (train/<class>/*, optional val/).

    python train_tokenizer.py --data_path demo_output/digits --out_dir demo_output/vae --reso 16 \
        --patch_nums 1,2,3,4 --ch_mult 1,2,4 --num_res_blocks 1 --ch 32 --V 128 --Cvae 16 --max_steps 600

Defaults are the official tokenizer's architecture (vae_ch160v4096z32, 256 px). Writes
`out_dir/vae.pth` (weights + config; pass it to train.py / gen_img.py as --vae_ckpt) and the resumable
`out_dir/vae-ckpt-last.pth`; a rerun with the same out_dir continues from the last checkpoint.
"""
import argparse
import json
import sys
from dataclasses import fields
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    """One flag per TokenizerConfig field, typed from its default; help text from the field metadata."""
    from utils.sample.args import int_tuple, str2bool
    from utils.train.tokenizer_trainer import TokenizerConfig
    p = argparse.ArgumentParser(description='Train the multi-scale VQVAE tokenizer of VAR / VIAR.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TokenizerConfig()
    for f in fields(TokenizerConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            kw = dict(type=str2bool, nargs='?', const=True, metavar='BOOL')
        elif isinstance(default, tuple):
            kw = dict(type=int_tuple, metavar='1,2,...')
        else:
            kw = dict(type=type(default))
        p.add_argument(f'--{f.name}', default=default, help=f.metadata.get('help', ''), **kw)
    return p


def main(argv: Optional[List[str]] = None):
    """Parse flags, train, print the final metrics as JSON."""
    from utils.checkpoint import CheckpointError
    from utils.train.tokenizer_trainer import TokenizerConfig, TokenizerConfigError, train_tokenizer
    args = build_parser().parse_args(argv)
    cfg = TokenizerConfig(**vars(args))
    if not cfg.data_path:
        sys.exit('train_tokenizer: --data_path is required (a folder with train/<class>/ images, '
                 'e.g. `python scripts/make_digits.py --out demo_output/digits`)')
    try:
        metrics = train_tokenizer(cfg)
    except (TokenizerConfigError, CheckpointError) as e:
        sys.exit(f'train_tokenizer: {e}')
    print(json.dumps(metrics))


if __name__ == '__main__':
    main()
