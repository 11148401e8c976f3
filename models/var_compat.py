"""VAR's module API beside this project's own, so code written against VAR's internals runs unchanged.

Shapes: B batch, l tokens of one scale, V vocabulary, C width, D condition width, H heads, c head dim.

The project calls its blocks as `block(x_BLC, ada_B16C, attn_bias, kv)`; code written for VAR calls
`block(x=x, cond_BD=..., attn_bias=None)` after `block.attn.kv_caching(True)` and reads `var.rng`,
`var.uniform_prob` and VAR's sampling helpers. The mixins here give the project's classes those names, reaching
the same maths; docs/VAR_COMPAT.md lists what is supported.
"""
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from models import sample_ops

Cached = Union[None, torch.Tensor, Dict[int, torch.Tensor]]


class OfficialKV:
    """The `kv` argument of SelfAttention.forward that keeps VAR's caching state on the attention module:
    one (B, H, L, c) tensor grown by every call (cur_it < 0), or, for VIAR's implicit block, one per iteration index
    (iteration t attends to the earlier scales' iteration t only, as the official VIAR's)."""

    def __init__(self, attn: 'OfficialAttnCaching', cur_it: int):
        self.attn, self.cur_it = attn, cur_it

    @torch.compiler.disable   # Python bookkeeping, as KVCache.append: a compiled block breaks its graph here
    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values to the attention's cache; return everything cached so far."""
        attn, t = self.attn, self.cur_it
        if t < 0:
            attn.cached_k, attn.cached_v = _grow(attn.cached_k, k_BHlc), _grow(attn.cached_v, v_BHlc)
            return attn.cached_k, attn.cached_v
        if attn.cached_k is None:
            attn.cached_k, attn.cached_v = {}, {}
        attn.cached_k[t], attn.cached_v[t] = _grow(attn.cached_k.get(t), k_BHlc), _grow(attn.cached_v.get(t), v_BHlc)
        return attn.cached_k[t], attn.cached_v[t]


def _grow(old_BHLc: Optional[torch.Tensor], new_BHlc: torch.Tensor) -> torch.Tensor:
    """The cache after appending one scale's tokens (the first scale starts it)."""
    return new_BHlc if old_BHLc is None else torch.cat((old_BHLc, new_BHlc), dim=2)


class OfficialAttnCaching:
    """VAR's stateful KV caching on an attention module: `kv_caching(True)` starts an empty cache that every
    official-style block call appends to; `kv_caching(False)` clears it. The project's calls pass their own cache."""

    caching: bool = False
    cached_k: Cached = None
    cached_v: Cached = None

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def official_kv(self, cur_it: int = -1) -> Optional[OfficialKV]:
        """The cache an official-style call attends through (None while caching is off)."""
        return OfficialKV(self, cur_it) if self.caching else None


_OFFICIAL_KEYWORDS = frozenset(('x', 'cond_BD', 'cur_it'))


class OfficialBlockCall:
    """VAR's block call `block(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)` (VIAR's implicit block also
    `block(x, cond_BD_or_gss, attn_bias, cur_it=it)`): recognised by its keywords; a positional call is the
    project's `(x_BLC, ada_B16C, attn_bias, kv, path_keep_2B)`."""

    def __call__(self, *args, **kwargs):
        if kwargs and not _OFFICIAL_KEYWORDS.isdisjoint(kwargs):
            return self.official_forward(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def official_forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                         cur_it: int = -1) -> torch.Tensor:
        """VAR's AdaLNSelfAttn.forward: cond_BD is the raw (B, D) condition, or `shared_ada_lin(cond_BD)` for a
        shared-AdaLN block; attends through the official cache while caching is on."""
        return super().__call__(x, self.modulation(cond_BD), attn_bias, self.attn.official_kv(cur_it))


class OfficialModelAttrs:
    """VAR's `rng` and `uniform_prob`, on the device of the model (read from its `lvl_1L` buffer)."""

    @property
    def rng(self) -> torch.Generator:
        """One generator kept by the model (VAR seeds it with `var.rng.manual_seed(seed)`), remade on a device move."""
        dev = self.lvl_1L.device
        g = self.__dict__.get('_official_rng')
        if g is None or g.device != dev:
            self._official_rng = g = torch.Generator(device=dev)
        return g

    @property
    def uniform_prob(self) -> torch.Tensor:
        """(1, num_classes) float32: the uniform class distribution VAR draws random labels from."""
        return torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32,
                          device=self.lvl_1L.device)


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: Optional[torch.Generator] = None, num_samples: int = 1) -> torch.Tensor:
    """VAR's sampler: filter logits_BlV in place (top-k, then top-p), draw num_samples per position: (B, l, n).
    A negative num_samples draws abs(num_samples) without replacement, as VAR's. For num_samples == 1 the draws are
    those of `sample_ops.sample_top_k_top_p_` (the project's exact sampler)."""
    B, l, V = logits_BlV.shape
    probs_NV = sample_ops.filter_top_k_top_p_(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    n = abs(num_samples)
    return torch.multinomial(probs_NV, num_samples=n, replacement=num_samples >= 0, generator=rng).view(B, l, n)


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """VAR's Gumbel softmax over `dim` with noise drawn from rng (None: F.gumbel_softmax on the global generator,
    the only use of eps); hard: one-hot values, gradients of the soft ones. Over the last dim of contiguous logits
    it equals `sample_ops.gumbel_softmax` (the project's `more_smooth`)."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=hard, eps=eps, dim=dim)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format)
    y_hard.scatter_(dim, y_soft.max(dim, keepdim=True)[1], 1.0)
    return y_hard - y_soft.detach() + y_soft
