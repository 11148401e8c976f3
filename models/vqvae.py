"""The multi-scale VQVAE tokenizer of VAR: Encoder -> quant_conv -> residual quantizer -> post_quant_conv -> Decoder.

Shapes legend:
    B: batch size                 H, W: image side (pixels), images in [-1, 1]
    Cvae: code dim (z_channels)   h, w: latent side = H / downsample = last patch num
    pn: token-map side at a scale l = pn * pn tokens at one scale     V: vocabulary size
"""
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .basic_vae import Decoder, Encoder
from .quant import PatchNums, VectorQuantizer2

__all__ = ['VQVAE']


class VQVAE(nn.Module):
    """Image tokenizer; the defaults with ch=160 are the official `vae_ch160v4096z32` (ch_mult and num_res_blocks
    can shrink for small images); test_mode=True: eval mode, every parameter frozen, as VAR training expects."""

    def __init__(
        self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0,
        beta: float = 0.25,             # commitment loss weight
        using_znorm: bool = False,      # cosine instead of L2 nearest-code search
        quant_conv_ks: int = 3,         # kernel size of quant_conv / post_quant_conv
        quant_resi: float = 0.5,        # Phi(h) = (1 - quant_resi) * h + quant_resi * conv(h)
        share_quant_resi: int = 4,      # 0: one Phi per scale, 1: a single Phi, k > 1: k shared Phis
        default_qresi_counts: int = 0,  # Phis when share_quant_resi == 0; 0 means len(v_patch_nums)
        v_patch_nums: PatchNums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
    ):
        super().__init__()
        self.test_mode = test_mode
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        net_kw = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, dropout=dropout,
                      z_channels=z_channels)
        self.encoder = Encoder(**net_kw)
        self.decoder = Decoder(**net_kw)
        self.quantize = VectorQuantizer2(
            vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
            default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
            quant_resi=quant_resi, share_quant_resi=share_quant_resi,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)

        if test_mode:
            self.eval()
            self.requires_grad_(False)

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent (B, Cvae, h, w) before quantization."""
        return self.quant_conv(self.encoder(img_B3HW))

    def forward(self, inp_B3HW: torch.Tensor, ret_usages: bool = False, world_size: int = 1
                ) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """Tokenizer training pass: (reconstruction (B, 3, H, W) unclamped, usages % or None, vq loss)."""
        f_hat, usages, vq_loss = self.quantize(self.img_to_f(inp_B3HW), ret_usages=ret_usages, world_size=world_size)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode f_hat (B, Cvae, h, w) to an image (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums: Optional[PatchNums] = None,
                     prog_si: int = -1) -> List[torch.LongTensor]:
        """Token indices per scale, each (B, pn * pn), smallest scale first (up to scale prog_si if >= 0)."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(inp_img_no_grad), to_fhat=False,
                                                v_patch_nums=v_patch_nums, prog_si=prog_si)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Decode per-scale indices (B, pn * pn) to images after each scale (or only the last)."""
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Decode per-scale embeddings (B, Cvae, pn, pn) to images in [-1, 1]."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums: Optional[PatchNums] = None, last_one: bool = False
                                 ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Reconstruct images using the first 1, 2, ..., S scales (or only all S when last_one)."""
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Like nn.Module.load_state_dict, but keeps our own usage EMA when the file has another scale count."""
        key = 'quantize.ema_vocab_hit_SV'
        ours = self.quantize.ema_vocab_hit_SV
        if key in state_dict and state_dict[key].shape[0] != ours.shape[0]:
            state_dict = {**state_dict, key: ours.detach().clone()}  # a copy: never mutate the caller's dict
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
