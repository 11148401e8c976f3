"""Transformer blocks of VAR/VIAR: AdaLN self-attention block, feed-forward, AdaLN head norm.

Shapes: B batch, L tokens, C width, D condition width (= C), H heads, c = C // H head dim.
Parameter names match the official checkpoints (`attn.mat_qkv`, `ffn.fc1`, `ada_lin.1`, ...).
The AdaLN modulation is computed by `modulation(cond)` and passed to `forward`, so a caller that
runs a block many times under one condition (the implicit block, sampling) computes it once.
"""
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.kv_cache import KVCache
from models.var_compat import OfficialAttnCaching, OfficialBlockCall


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, keep_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """keep_B: (B,) scales drawn by the caller (models/draws.py: 0 or 1/keep per sample); None draws them
        here from the global generator, as official."""
        if not self.training or self.drop_prob == 0.0:   # training first: a compiled eval block guards on nothing else
            return x
        if keep_B is not None:
            return x * keep_B.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1))
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:g}'


class FFN(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.onednn = False   # only on the fast sampler's copy (enable_onednn_dense)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        if runs_onednn(self.onednn, x_BLC, self.fc1.weight):   # GELU on the fp32 accumulator, rounded once
            return self.drop(dense(dense(x_BLC, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight,
                                   self.fc2.bias))
        return self.drop(self.fc2(self.act(self.fc1(x_BLC))))


def dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False) -> torch.Tensor:
    """F.linear (then tanh GELU, fused) as one oneDNN kernel: in fp32 faster than torch's GEMM on the AMD EPYC of
    docs/SPEED.md (not measured on Intel CPUs) and, in bf16, the same kernel F.linear runs."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], 'tanh' if gelu else '')


def runs_onednn(flag: bool, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a block of the fast sampler's copy calls `dense`: sampling only (no grad, not under compile, which
    fuses on its own and cannot lower the op), with input and weight in one dtype."""
    return flag and x.dtype == weight.dtype and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=None)
def onednn_dense(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN runs `dense` (with its GELU) in `dtype`. A CPU without bf16 kernels, or one whose
    oneDNN is capped below them (ONEDNN_MAX_CPU_ISA=AVX2), refuses bf16: probed once per dtype."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        dense(torch.ones(2, 16, dtype=dtype), torch.ones(16, 16, dtype=dtype), None, gelu=True)
    except RuntimeError:
        return False
    return True


def enable_onednn_dense(model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Let the blocks of a sampling copy whose Linear weights are `dtype` run their Linear layers through `dense`
    where oneDNN can: on a CPU, in bf16 or fp32 (never the exact path or training, which use the model itself)."""
    on = device_type == 'cpu' and dtype in (torch.bfloat16, torch.float32) and onednn_dense(dtype)
    for m in model.modules():
        if isinstance(m, (FFN, SelfAttention)):
            m.onednn = on


class SelfAttention(OfficialAttnCaching, nn.Module):
    """Multi-head self-attention with optional L2-normalised q/k and a learnable per-head scale (VAR's stateful
    `kv_caching` beside the `kv` argument: models/var_compat.py)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = False):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))   # keys carry no bias
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.onednn = False   # only on the fast sampler's copy (enable_onednn_dense)

    def reset_special(self):
        """Values the generic Linear init does not set: the log scale and the q/v/k biases."""
        if self.attn_l2_norm:
            self.scale_mul_1H11.data.fill_(math.log(4.0))
        self.q_bias.data.zero_()
        self.v_bias.data.zero_()
        self.zero_k_bias.zero_()

    def forward(self, x_BLC: torch.Tensor, attn_bias: Optional[torch.Tensor],
                kv: Optional[KVCache] = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias_3C = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        onednn = runs_onednn(self.onednn, x_BLC, self.mat_qkv.weight)
        qkv_BL3Hc = (dense if onednn else F.linear)(x_BLC, self.mat_qkv.weight, bias_3C.to(self.mat_qkv.weight.dtype))
        qkv_BL3Hc = qkv_BL3Hc.view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:   # q and k normalised by one kernel: same per-vector arithmetic, fewer launches
            q_BHLc, k_BHLc = F.normalize(qkv_BL3Hc[:, :, :2], dim=-1).permute(2, 0, 3, 1, 4).unbind(0)
            q_BHLc = q_BHLc.mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            # CUDA autocast runs norm in fp32; keys go back to the compute dtype so cached keys take fp16/bf16
            # like values: attention casts them to that dtype anyway, so the numbers are the official ones.
            # q keeps one rounding (after the scale), as official. fp32: a no-op.
            k_BHLc = k_BHLc.to(qkv_BL3Hc.dtype)
        if kv is not None:   # inference: attend to every cached earlier scale plus this one
            k_BHLc, v_BHLc = kv.append(k_BHLc, v_BHLc)
        out_BHLc = F.scaled_dot_product_attention(
            q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0)
        out_BLC = out_BHLc.transpose(1, 2).reshape(B, L, C)
        out_BLC = dense(out_BLC, self.proj.weight, self.proj.bias) if onednn else self.proj(out_BLC)
        return self.proj_drop(out_BLC)

    def extra_repr(self) -> str:
        return f'attn_l2_norm={self.attn_l2_norm}'


class AdaLNSelfAttn(OfficialBlockCall, nn.Module):
    """Pre-norm transformer block whose LayerNorm scale/shift and residual gates come from the class condition
    (also callable as VAR's `block(x=, cond_BD=, attn_bias=)`: models/var_compat.py)."""

    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, num_heads: int, shared_aln: bool = False,
                 mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 attn_l2_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path = DropPath(drop_path)   # also at rate 0: every block has one structure (one compiled graph)
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C) gamma1, gamma2, scale1, scale2, shift1, shift2 from cond_BD (or the shared B16C)."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(self, x_BLC: torch.Tensor, ada_B16C: torch.Tensor, attn_bias: Optional[torch.Tensor],
                kv: Optional[KVCache] = None, path_keep_2B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """path_keep_2B: drop-path scales of the attention and MLP branches (models/draws.py); None: drawn here."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        keep_attn, keep_ffn = (None, None) if path_keep_2B is None else path_keep_2B.unbind(0)
        h = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        # out of place: under FSDP the attention output crosses a unit boundary (a graph input under compile, where
        # an in-place op on it breaks autograd); same values
        x_BLC = x_BLC + self.drop_path(self.attn(h, attn_bias, kv).mul(gamma1), keep_attn)
        h = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2), keep_ffn)

    def extra_repr(self) -> str:
        return f'shared_aln={self.shared_aln}'


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN (scale and shift only) before the vocabulary head."""

    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1, 2, C) scale and shift."""
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.C)

    def forward(self, x_BLC: torch.Tensor, ada_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = ada_B12C.unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection (`saln`): one Linear for all blocks, output viewed as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


def init_block_(block: AdaLNSelfAttn, depth: int, init_adaln: float, init_adaln_gamma: float):
    """Official per-block init on top of the generic one: residual projections scaled by 1/sqrt(2*depth),
    AdaLN gates (gamma channels) near zero so every block starts close to identity."""
    C = block.C
    block.attn.proj.weight.data.div_(math.sqrt(2 * depth))
    block.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
    if block.shared_aln:
        block.ada_gss.data[:, :, 2:].mul_(init_adaln)
        block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
    else:
        lin = block.ada_lin[-1]
        lin.weight.data[2 * C:].mul_(init_adaln)
        lin.weight.data[:2 * C].mul_(init_adaln_gamma)
        lin.bias.data.zero_()
