"""Convolutional encoder and decoder of the multi-scale VQVAE (VQGAN / LDM "vq-f16" layout).

Shapes legend:
    B: batch size            H, W: image height, width (pixels)
    C: channels of a block   h, w: feature-map height, width
    L: h * w positions       Cz: latent channels (z_channels)

Parameter names (`conv_in`, `down.{i}.block.{j}`, `mid.attn_1`, `up.{i}.upsample`, ...) follow the
official checkpoint so its state dict loads with strict=True.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Encoder', 'Decoder']

NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as every normalisation layer of the tokenizer."""
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv; the zero pad goes on the right and bottom only, so h, w halve exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))  # (B, C, h/2, w/2)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode='nearest'))  # (B, C, 2h, 2w)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) twice, 1x1 shortcut if C changes. SiLU runs in
    place on the norm's fresh output, as the official: one full-resolution activation less alive in a decode."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw), inplace=True))
        h_BChw = self.conv2(self.dropout(F.silu(self.norm2(h_BChw), inplace=True)))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # The products run on contiguous operands in the official order (q k, then v attn^T, giving
        # (B, C, L) directly): other layouts give the same values up to float rounding only, and the
        # decoded images would then differ from the official tokenizer's in the last bits.
        B, C, h, w = x_BChw.shape
        q_BCL, k_BCL, v_BCL = self.qkv(self.norm(x_BChw)).view(B, 3, C, h * w).unbind(1)
        q_BLC = q_BCL.transpose(1, 2).contiguous()
        attn_BLL = torch.bmm(q_BLC, k_BCL.contiguous()).mul_(C ** -0.5).softmax(dim=2)   # [b, query, key]
        out_BCL = torch.bmm(v_BCL.contiguous(), attn_BLL.transpose(1, 2).contiguous())
        return x_BChw + self.proj_out(out_BCL.view(B, C, h, w))


class _Level(nn.Module):
    """One resolution level: n_blocks res blocks, each followed by self-attention when `attend` (the lowest level)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, dropout: float, attend: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attend else 0))

    def run_blocks(self, h_BChw: torch.Tensor) -> torch.Tensor:
        """Apply every res block, each followed by its attention layer where there is one."""
        for i, block in enumerate(self.block):
            h_BChw = block(h_BChw)
            if len(self.attn):
                h_BChw = self.attn[i](h_BChw)
        return h_BChw


class _Middle(nn.Module):
    """Res block, self-attention, res block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BChw)))


def check_widths(ch: int, ch_mult: Sequence[int]) -> None:
    """Raise ValueError unless every level width ch * m suits GroupNorm(32)."""
    if len(ch_mult) == 0:
        raise ValueError('ch_mult must name at least one resolution level, e.g. (1, 2, 4)')
    bad = [ch * m for m in ch_mult if (ch * m) % NORM_GROUPS != 0 or m <= 0]
    if ch <= 0 or bad:
        raise ValueError(f'every width ch * ch_mult[i] must be a positive multiple of {NORM_GROUPS} '
                         f'(GroupNorm groups); got ch={ch}, ch_mult={tuple(ch_mult)}')


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, Cz, H/d, W/d) with d = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, dropout: float, z_channels: int):
        super().__init__()
        check_widths(ch, ch_mult)
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        c_in = ch
        for lvl, c_out in enumerate(ch * m for m in ch_mult):
            lowest = lvl == len(ch_mult) - 1
            level = _Level(c_in, c_out, num_res_blocks, dropout, attend=lowest)
            if not lowest:
                level.downsample = Downsample2x(c_out)
            self.down.append(level)
            c_in = c_out

        self.mid = _Middle(c_in, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(img_B3HW)
        for level in self.down:
            h_BChw = level.run_blocks(h_BChw)
            if hasattr(level, 'downsample'):
                h_BChw = level.downsample(h_BChw)
        h_BChw = self.mid(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw), inplace=True))  # (B, Cz, h, w)


class Decoder(nn.Module):
    """Latent (B, Cz, h, w) -> image (B, 3, h*d, w*d); mirrors the Encoder with one extra block per level."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, dropout: float, z_channels: int):
        super().__init__()
        check_widths(ch, ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Middle(c_in, dropout)

        # Built from the lowest resolution up, but stored so that up[i] is the level of ch_mult[i]
        # (the checkpoint's numbering).
        levels = []
        for lvl in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[lvl]
            level = _Level(c_in, c_out, num_res_blocks + 1, dropout, attend=lvl == len(ch_mult) - 1)
            if lvl != 0:
                level.upsample = Upsample2x(c_out)
            levels.append(level)
            c_in = c_out
        self.up = nn.ModuleList(reversed(levels))

        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h_BChw = level.run_blocks(h_BChw)
            if hasattr(level, 'upsample'):
                h_BChw = level.upsample(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw), inplace=True))  # (B, 3, H, W)
