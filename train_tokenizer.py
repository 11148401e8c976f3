"""Train the multi-scale residual VQVAE tokenizer on an image folder (train/<class>/*, optional val/).

    python train_tokenizer.py --data_path demo_output/digits --out_dir demo_output/vae --reso 16 \
        --patch_nums 1,2,3,4 --ch_mult 1,2,4 --num_res_blocks 1 --ch 32 --V 128 --Cvae 16 --max_steps 600

Defaults are the official tokenizer's architecture (vae_ch160v4096z32, 256 px). Writes
`out_dir/vae.pth` (weights + config; pass it to train.py / gen_img.py as --vae_ckpt) and the resumable
`out_dir/vae-ckpt-last.pth`; a rerun with the same out_dir continues from the last checkpoint.
"""
import json
import sys
from typing import List, Optional

from utils import cli
from utils.checkpoint import CheckpointError
from utils.train.tokenizer_trainer import TokenizerConfig, TokenizerConfigError, train_tokenizer


@cli.exits_on_write_error
def main(argv: Optional[List[str]] = None):
    """Parse flags, train, print the final metrics as JSON."""
    cfg = cli.parse_dataclass(TokenizerConfig, argv, 'Train the multi-scale VQVAE tokenizer of VAR / VIAR.',
                              'tokenizer')
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
