"""Multi-scale residual vector quantizer of VAR, with the shared quant-residual convs "Phi".

Shapes legend:
    B: batch size              C: code dim (Cvae)          V: vocabulary size
    H, W: latent side (= last patch num)                   S (SN): number of scales
    pn / (ph, pw): token-map side at one scale             l = ph * pw tokens at one scale
    L: tokens over all scales  first_l: tokens of scale 0  N: B * l positions at one scale

Scale k quantizes the area-downsampled residual f - f_hat to a (ph, pw) token map, bicubically
upsamples its embeddings to (H, W), passes them through Phi_k and adds them to f_hat.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['VectorQuantizer2', 'Phi', 'PhiShared', 'PhiPartiallyShared', 'PhiNonShared',
           'phi_ticks', 'nearest_tick', 'scale_position', 'to_patch_hws', 'usage_margin', 'ema_hit_update']

PatchNums = Sequence[Union[int, Tuple[int, int]]]


# ----------------------------------------------------------------------------- pure helpers
def phi_ticks(K: int) -> np.ndarray:
    """Positions in [0, 1] that the K shared Phi convs stand for (K == 4 uses a 1/3 margin)."""
    margin = 1 / 3 / K if K == 4 else 1 / 2 / K
    return np.linspace(margin, 1 - margin, K)


def nearest_tick(ticks: np.ndarray, at: float) -> int:
    """Index of the tick closest to `at` (the first one on a tie)."""
    return int(np.argmin(np.abs(ticks - at)))


def scale_position(si: int, SN: int) -> float:
    """Relative depth si / (SN - 1) in [0, 1] of scale si among SN scales (0 when SN == 1)."""
    return si / (SN - 1) if SN > 1 else 0.0


def to_patch_hws(v_patch_nums: PatchNums) -> List[Tuple[int, int]]:
    """Normalise patch nums (ints or (h, w) pairs) to a list of (ph, pw)."""
    return [(pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1])) for pn in v_patch_nums]


def usage_margin(positions_per_rank: int, vocab_size: int, world_size: int = 1) -> float:
    """Hit count a code needs in the usage EMA to count as used: 8% of a uniform share of all hits."""
    return world_size * positions_per_rank / vocab_size * 0.08


def ema_hit_update(ema_V: torch.Tensor, hit_V: torch.Tensor, n_updates: int) -> None:
    """Update one scale's hit EMA in place: copy at the first update, decay 0.9 before 100, then 0.99."""
    if n_updates == 0:
        ema_V.copy_(hit_V)
    elif n_updates < 100:
        ema_V.mul_(0.9).add_(hit_V * 0.1)
    else:
        ema_V.mul_(0.99).add_(hit_V * 0.01)


# ----------------------------------------------------------------------------- Phi convs
class Phi(nn.Conv2d):
    """Quant-residual conv: Phi(h) = (1 - r) * h + r * conv3x3(h)."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


class PhiShared(nn.Module):
    """One Phi for every scale; indexing by any position returns it."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K Phis shared among the scales: position t in [0, 1] picks the Phi of the nearest tick."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[nearest_tick(self.ticks, at_from_0_to_1)]

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (stored as a plain ModuleList); indexed by position like the shared kinds."""

    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(nearest_tick(self.ticks, at_from_0_to_1))

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


# ----------------------------------------------------------------------------- quantizer
class VectorQuantizer2(nn.Module):
    """Residual quantizer over the scales `v_patch_nums`; never touches torch.distributed: `forward` records the
    step's code hits in `last_hit_SV`, the trainer sums them over ranks and calls `update_usage`."""

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: PatchNums = None, quant_resi: float = 0.5,
                 share_quant_resi: int = 4):
        super().__init__()
        if not v_patch_nums:
            raise ValueError('v_patch_nums must list the token-map side of every scale, e.g. (1, 2, 3, 4)')
        self.vocab_size, self.Cvae, self.using_znorm, self.beta = vocab_size, Cvae, using_znorm, beta
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:  # one Phi per scale
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:  # a single Phi for all scales
            self.quant_resi = PhiShared(make_phi())
        else:  # share_quant_resi Phis spread over the scales
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))

        self.register_buffer('ema_vocab_hit_SV', torch.zeros(len(self.v_patch_nums), vocab_size))
        self.record_hit = 0  # number of per-scale EMA updates so far (not saved, as in the official code)
        self.last_hit_SV: Optional[torch.Tensor] = None
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        return (f'{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}  |  '
                f'S={len(self.v_patch_nums)}, quant_resi={self.quant_resi_ratio}')

    def phi(self, si: int, SN: int) -> nn.Module:
        """The Phi conv applied to scale si of SN."""
        return self.quant_resi[scale_position(si, SN)]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the nearest codebook entry: L2 distance, or cosine when using_znorm."""
        codes_VC = self.embedding.weight.data
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codes_VC, dim=-1).T, dim=1)
        dist_NV = z_NC.square().sum(dim=1, keepdim=True) + codes_VC.square().sum(dim=1)
        dist_NV.addmm_(z_NC, codes_VC.T, alpha=-2, beta=1)
        return torch.argmin(dist_NV, dim=1)

    def _quantize_scale(self, f_rest_BChw: torch.Tensor, ph: int, pw: int, last: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes (B, ph*pw) of the residual at one scale, and their embeddings upsampled to (B, C, H, W)."""
        B, C, H, W = f_rest_BChw.shape
        small_BChw = f_rest_BChw if last else F.interpolate(f_rest_BChw, size=(ph, pw), mode='area')
        idx_N = self.nearest_code(small_BChw.permute(0, 2, 3, 1).reshape(-1, C))
        h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
        h_BChw = h_BChw.contiguous() if last else F.interpolate(h_BChw, size=(H, W), mode='bicubic').contiguous()
        return idx_N.view(B, ph * pw), h_BChw

    # ------------------------------------------------------------------ tokenizer training
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False, world_size: int = 1
                ) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """(straight-through f_hat, usages in % or None, vq loss = mean over scales of
        beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2); usages read the EMA as it stands."""
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(self.v_patch_nums)
        hit_SV = torch.zeros(SN, self.vocab_size, device=f_BChw.device)
        vq_loss = f_BChw.new_zeros(())
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            for si, (ph, pw) in enumerate(to_patch_hws(self.v_patch_nums)):
                idx_Bl, h_BChw = self._quantize_scale(f_rest, ph, pw, last=si == SN - 1)
                hit_SV[si] = idx_Bl.flatten().bincount(minlength=self.vocab_size).float()
                h_BChw = self.phi(si, SN)(h_BChw)
                f_hat = f_hat + h_BChw
                f_rest.sub_(h_BChw.detach())  # the residual only steers code choice, never gradients
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / SN
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw  # straight-through to the encoder
        self.last_hit_SV = hit_SV

        usages = self.usage_percentages(B * H * W, world_size) if ret_usages else None
        return f_hat, usages, vq_loss

    @torch.no_grad()
    def update_usage(self, hit_SV: torch.Tensor) -> None:
        """Fold one step's hit counts (S, V), summed over ranks, into the EMA. The counter advances once per scale,
        as in the official code, so in the first step only scale 0 is copied."""
        if tuple(hit_SV.shape) != tuple(self.ema_vocab_hit_SV.shape):
            raise ValueError(f'hit_SV must have shape {tuple(self.ema_vocab_hit_SV.shape)} (scales, vocab); '
                             f'got {tuple(hit_SV.shape)}')
        hit_SV = hit_SV.to(self.ema_vocab_hit_SV)
        for si in range(hit_SV.shape[0]):
            ema_hit_update(self.ema_vocab_hit_SV[si], hit_SV[si], self.record_hit)
            self.record_hit += 1

    def usage_percentages(self, positions_per_rank: int, world_size: int = 1) -> List[float]:
        """Per-scale % of codes whose hit EMA reaches `usage_margin`."""
        margin = usage_margin(positions_per_rank, self.vocab_size, world_size)
        return [(ema_V >= margin).float().mean().item() * 100 for ema_V in self.ema_vocab_hit_SV]

    # ------------------------------------------------------------------ encoding and decoding
    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
                      ) -> Union[List[torch.Tensor], torch.Tensor]:
        """f_hat after each scale (or only the last) from embeddings (B, C, pn, pn); all_to_max_scale=False:
        accumulated at each scale's own size (experimental)."""
        B, SN = ms_h_BChw[0].shape[0], len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        ls_f_hat_BChw = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(SN):
                h_BChw = ms_h_BChw[si]
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode='bicubic')
                f_hat.add_(self.phi(si, SN)(h_BChw))
                if not last_one:
                    ls_f_hat_BChw.append(f_hat.clone())
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode='bicubic')
                f_hat.add_(self.phi(si, SN)(ms_h_BChw[si]))
                if not last_one:
                    ls_f_hat_BChw.append(f_hat)
        return f_hat if last_one else ls_f_hat_BChw

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums: Optional[PatchNums] = None,
                           prog_si: int = -1) -> List[torch.Tensor]:
        """Per scale, the token indices (B, l) or f_hat (B, C, H, W) so far; prog_si >= 0 stops after that scale."""
        B, C, H, W = f_BChw.shape
        patch_hws = to_patch_hws(v_patch_nums or self.v_patch_nums)
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the last patch num {patch_hws[-1]} must equal the latent size {(H, W)}: '
                             f'use images of side last_patch_num * downsample')
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out: List[torch.Tensor] = []
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws[:prog_si + 1 if prog_si >= 0 else None]):
            idx_Bl, h_BChw = self._quantize_scale(f_rest, ph, pw, last=si == SN - 1)
            h_BChw = self.phi(si, SN)(h_BChw)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_Bl)
        return out

    # ------------------------------------------------------------------ VAR inputs
    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor], prog_si: int = -1) -> torch.Tensor:
        """Teacher-forcing input (B, L - first_l, C), float32 or float64: f_hat after scales < k, area-pooled to
        scale k; prog_si >= 0 stops at the input of that scale."""
        B, C, SN = gt_ms_idx_Bl[0].shape[0], self.Cvae, len(self.v_patch_nums)
        H = W = self.v_patch_nums[-1]
        dtype = torch.promote_types(self.embedding.weight.dtype, torch.float32)   # float32, or float64 for float64
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=dtype)
        next_scales = []
        for si in range(SN - 1 if prog_si < 0 else min(prog_si, SN - 1)):   # the inputs of scales 1, 2, ...
            pn, pn_next = self.v_patch_nums[si], self.v_patch_nums[si + 1]
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(H, W), mode='bicubic')))
            next_BChw = F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')
            next_scales.append(next_BChw.view(B, C, -1).transpose(1, 2))
        if not next_scales:  # a single scale, or prog_si == 0: nothing to teacher-force
            return f_hat.new_zeros(B, 0, C)
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's embeddings h (B, C, pn, pn) into f_hat IN PLACE; return (f_hat, next scale's input map)."""
        HW = self.v_patch_nums[-1]
        if si == SN - 1:
            f_hat.add_(self.phi(si, SN)(h_BChw))
            return f_hat, f_hat
        f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')))
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')
