"""VAR: class-conditional next-scale prediction over a multi-scale VQVAE token pyramid.

Shapes: B batch, L tokens over all scales (680 for 256 px), l tokens of one scale, C width,
D condition width (= C), V vocabulary, Cv VQVAE code dim, K scales.

`VARBase` owns everything VAR and VIAR share (embeddings, mask, head, training forward,
KV-cached sampling); a subclass supplies only its backbone: `VAR` an explicit stack of blocks,
`models.viar.VIAR` pre-blocks, one weight-shared implicit block iterated to a fixed point,
post-blocks. So the explicit/implicit choice is made once, by the class.
"""
import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from models import sample_ops
from models.draws import BatchDraws, step_draws
from models.blocks import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, enable_onednn_dense, init_block_
from models.kv_cache import Alloc, KVCache, new_buffer, reserve_slot
from models.layout import block_causal_bias, level_ids, num_tokens, scale_begin_ends
from models.schedules import IterSchedule, linspace_iters
from models.solver import SolverSpec
from models.var_compat import OfficialModelAttrs
from models.var_compat import gumbel_softmax_with_rng, sample_with_top_k_top_p_  # noqa: F401 (VAR's models.var names)


@dataclass
class EditSpec:
    """Zero-shot editing: at scale k, tokens where keep_Bl[k] is True are forced to gt_idx_Bl[k]."""
    gt_idx_Bl: List[torch.Tensor]
    keep_Bl: List[torch.Tensor]


@dataclass
class SampleStats:
    """What one sampling call did: implicit iterations and final residual per scale, KV-cache bytes."""
    iters: List[int] = field(default_factory=list)
    residuals: List[Optional[float]] = field(default_factory=list)
    kv_cache_bytes: int = 0


class VARBase(OfficialModelAttrs, nn.Module):
    """Shared embeddings, block-causal training forward, head and KV-cached CFG sampling (VAR's `rng` and
    `uniform_prob` too: models/var_compat.py)."""

    use_implicit = False

    def __init__(self, vae_local, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                 num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = False,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes, self.cond_drop_rate = num_classes, cond_drop_rate
        self.patch_nums: Tuple[int, ...] = tuple(patch_nums)
        self.L, self.first_l = num_tokens(self.patch_nums), self.patch_nums[0] ** 2
        self.begin_ends = scale_begin_ends(self.patch_nums)
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.grad_ckpt = False   # activation checkpointing of blocks during training
        # the frozen VQVAE is held by reference, outside the state dict, as in the official code
        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)
        self._block_kw = dict(embed_dim=embed_dim, cond_dim=embed_dim, num_heads=num_heads, shared_aln=shared_aln,
                              mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                              attn_l2_norm=attn_l2_norm, norm_eps=norm_eps)
        self.drop_path_rate = drop_path_rate
        self.dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()

        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)   # index num_classes = the null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln
                               else nn.Identity())
        self.build_backbone()
        self.register_buffer('lvl_1L', level_ids(self.patch_nums).view(1, self.L))
        self.register_buffer('attn_bias_for_masking', block_causal_bias(self.patch_nums).contiguous())
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.reset_embeddings()

    # ---- what differs between VAR and VIAR, answered by the class ----
    kind = 'VAR'

    def draw_jfb_iters(self, step: Optional[int] = None, seed: int = 0) -> Optional[Tuple[int, int]]:
        """jfb_iters of a training step: S-JFB's (n iterations without grad, m with grad); None: no implicit block."""
        return None

    def eval_jfb_iters(self) -> Optional[Tuple[int, int]]:
        """Fixed jfb_iters for validation; None: no implicit block."""
        return None

    def drop_path_probs(self, jfb_iters: Optional[Tuple[int, int]] = None) -> List[float]:
        """The drop-path rate of every block call of a training forward, in call order."""
        return [b.drop_path.drop_prob for b in self.backbone_blocks()]

    def training_draws(self, seed: int, step: int, offset: int, rows: int, global_rows: int,
                       jfb_iters: Optional[Tuple[int, int]] = None, device=None) -> BatchDraws:
        """Class-dropout and drop-path draws of training step `step` for rows [offset, offset + rows) of a global
        batch of global_rows, the same whatever the world size (models/draws.py); pass them to forward."""
        return step_draws(seed, step, offset, rows, global_rows, self.cond_drop_rate, self.drop_path_probs(jfb_iters),
                          device)

    def fsdp_units(self) -> List[List[nn.Module]]:
        """Groups of modules to shard as one FSDP unit each, in the order to wrap them (the root last, by the caller).

        A block's attention and MLP form one unit, gathered while the block runs; its AdaLN projection is a unit of
        its own, because the modulations of all blocks are computed together before the blocks run. What no unit
        holds (embeddings, head, a shared AdaLN, VIAR's implicit block) is the root's unit.
        """
        units: List[List[nn.Module]] = []
        for b in self.sharded_blocks():
            if not b.shared_aln:
                units.append([b.ada_lin])
            units.append([b.attn, b.ffn])
        return units

    def sharded_blocks(self) -> List[AdaLNSelfAttn]:
        """The blocks whose weights FSDP shards block by block (each runs once per training forward)."""
        return self.backbone_blocks()

    def scale_loop_modules(self) -> List[nn.Module]:
        """The modules whose forward runs in the sampling scale loop (what compile targets)."""
        return [*self.backbone_blocks(), self.head_nm]

    def register_iterate_hook(self, fn):
        """fn(z_t, z_next) after every implicit iteration during sampling; VIAR only."""
        raise ValueError(f'a {self.kind} has no implicit block to watch; this needs a VIAR')

    def shared_with_copies(self) -> List[Any]:
        """Objects a `sampling_copy` uses as they are, not copied: the VQVAE (held outside the state dict)."""
        return [self.vae_proxy, self.vae_quant_proxy]

    def sampling_copy(self, dtype: Optional[torch.dtype] = None) -> 'VARBase':
        """The fast sampler's copy: Linear weights and biases cast to `dtype` once, where autocast casts them at every
        use (None: this model's own); every other parameter, buffer and `shared_with_copies` is this model's own object.
        Weights loaded later do not reach a cast copy: make a new one. On a CPU its Linear layers run through oneDNN
        (`blocks.dense`) where they can."""
        memo = {id(t): t for t in itertools.chain(self.parameters(), self.buffers(), self.shared_with_copies())}
        if dtype is not None:
            memo.update({id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
                         for m in self.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)})
        copy_ = copy.deepcopy(self, memo)
        enable_onednn_dense(copy_, dtype or self.class_emb.weight.dtype, self.lvl_1L.device.type)
        return copy_

    # ---- backbone interface (subclasses) ----
    def build_backbone(self):
        """Create the transformer blocks."""
        raise NotImplementedError

    def backbone_blocks(self) -> List[AdaLNSelfAttn]:
        """Every distinct block, in order (the implicit block once)."""
        raise NotImplementedError

    def train_backbone(self, x_BLC, ada, attn_bias, jfb_iters, path_keep_K2B=None) -> torch.Tensor:
        """Teacher-forced pass over all tokens under the block-causal mask (path_keep_K2B: drop-path scales of
        every block call, in the order of drop_path_probs; None draws them in the blocks)."""
        raise NotImplementedError

    def new_infer_state(self, schedule: IterSchedule, fill_forward: bool, solver: Optional[SolverSpec] = None,
                        fast: bool = False, alloc: Alloc = new_buffer) -> Any:
        """Fresh KV caches for one sampling call, their buffers from `alloc` (and, for VIAR, how it solves each
        scale; fast: the fast path's reordered arithmetic, same maths)."""
        raise NotImplementedError

    def infer_backbone(self, x_BlC, ada, state, si: int, schedule: IterSchedule, stats: SampleStats) -> torch.Tensor:
        """One scale of KV-cached sampling."""
        raise NotImplementedError

    def scale_slots(self, state, si: int, like: tuple, schedule: IterSchedule) -> Any:
        """For a captured scale step, before it runs: reserve the KV slot of every block call of scale si
        (kv_cache.reserve_slot; like = (rows, heads, head dim, dtype, device)). None: this scale cannot be
        captured (its iteration count depends on the residual, or hooks watch it); it runs eagerly."""
        raise NotImplementedError

    def slot_backbone(self, x_RlC, ada, slots) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`infer_backbone` on reserved slots, with no bookkeeping (traceable): (h_RlC, residual or None)."""
        raise NotImplementedError

    def end_slots(self, state, slots, residual: Optional[torch.Tensor], stats: SampleStats):
        """After a captured scale step: the bookkeeping `infer_backbone` does after its compute."""

    def scale_logits(self, x_RlC, ada, ada_head, cond_RD, slots, ratio: Optional[float]):
        """One scale from its input to the guided logits (B, l, V), writing the reserved KV slots: the step that
        utils/sample/compile_util.py compiles as one graph per scale. ratio: the CFG ratio; None: no guidance."""
        h_RlC, residual = self.slot_backbone(x_RlC, ada, slots)
        return self.get_logits(h_RlC, cond_RD, ada_head, ratio), residual

    # ---- shared pieces ----
    def _make_block(self, block_idx: int) -> AdaLNSelfAttn:
        """Block `block_idx` of the explicit stack, with its drop-path rate."""
        return AdaLNSelfAttn(block_idx=block_idx, drop_path=self.dpr[block_idx], **self._block_kw)

    def block_modulations(self, cond_BD: torch.Tensor) -> List[torch.Tensor]:
        """AdaLN modulation of every block for this condition, computed once per call."""
        cond = self.shared_ada_lin(cond_BD)
        return [b.modulation(cond) for b in self.backbone_blocks()]

    @staticmethod
    def _call_keeps(path_keep_K2B: Optional[torch.Tensor], calls: int) -> Callable[[int], Optional[torch.Tensor]]:
        """k -> the drop-path scales of block call k (None: the block draws them), once their count is checked."""
        if path_keep_K2B is None:
            return lambda k: None
        if path_keep_K2B.shape[0] != calls:
            raise ValueError(f'drop-path draws for {path_keep_K2B.shape[0]} block calls, this forward makes {calls}: '
                             f'draw them with training_draws(..., jfb_iters) of the same (n, m)')
        return path_keep_K2B.__getitem__

    def _checkpointed(self, fn: Callable, *args) -> torch.Tensor:
        """fn(*args), under activation checkpointing when grad_ckpt is on in a training forward with grad."""
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, ada_head: Optional[torch.Tensor] = None,
                   cfg_ratio: Optional[float] = None):
        """Vocabulary logits in float32 (float64 for a float64 model); with cfg_ratio, the guided logits of the
        conditional half from the 2B rows (sample_ops.guide)."""
        ada_head = self.head_nm.modulation(cond_BD) if ada_head is None else ada_head
        logits_BLV = at_least_fp32(self.head(at_least_fp32(self.head_nm(at_least_fp32(h_BLC), ada_head))))
        return logits_BLV if cfg_ratio is None else sample_ops.guide(logits_BLV, cfg_ratio)

    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor,
                jfb_iters: Optional[Tuple[int, int]] = None, prog_si: int = -1,
                draws: Optional[BatchDraws] = None) -> torch.Tensor:
        """Teacher forcing: logits_BLV for every token given the ground-truth earlier scales.

        x_BLCv_wo_first_l: (B, L - first_l, Cv) from `vae.quantize.idxBl_to_var_input`.
        jfb_iters: (n, m) S-JFB iterations for VIAR (ignored by VAR); None draws them (`draw_jfb_iters()`).
        prog_si >= 0 (progressive training): only scales 0..prog_si, so L becomes that scale's end.
        draws: class dropout and drop path from `training_draws` (the same for any world size); None draws
        them from the global generator, as official.
        """
        ed = self.begin_ends[prog_si][1] if prog_si >= 0 else self.L
        B = x_BLCv_wo_first_l.shape[0]
        if draws is not None and draws.cond_drop_B.shape[0] != B:
            raise ValueError(f'draws are for {draws.cond_drop_B.shape[0]} rows, the batch has {B}')
        with torch.autocast(label_B.device.type, enabled=False):
            drop_B = torch.rand(B, device=label_B.device) < self.cond_drop_rate if draws is None else draws.cond_drop_B
            label_B = torch.where(drop_B, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            # word_embed always runs (on an empty slice at prog_si == 0) so DDP sees it used
            words = self.word_embed(at_least_fp32(x_BLCv_wo_first_l[:, :ed - self.first_l]))
            x_BLC = torch.cat((sos, words), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed])
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        ada = self.block_modulations(cond_BD)
        dev = x_BLC.device.type
        main_type = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_BLC.dtype
        x_BLC, attn_bias = x_BLC.to(main_type), attn_bias.to(main_type)
        ada = [a.to(main_type) for a in ada]
        h_BLC = self.train_backbone(x_BLC, ada, attn_bias, jfb_iters,
                                    None if draws is None else draws.path_keep_K2B)
        return self.get_logits(h_BLC, cond_BD)

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: Optional[Union[int, torch.LongTensor]],
                                 g_seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                                 more_smooth: bool = False, iter_left: int = 10, iter_right: int = 10,
                                 schedule: Optional[IterSchedule] = None, fill_forward: bool = True,
                                 edit: Optional[EditSpec] = None, return_stats: bool = False,
                                 solver: Optional[SolverSpec] = None, fast: bool = False,
                                 scale_step: Optional[Callable] = None, alloc: Alloc = new_buffer):
        """Sample B images of class label_B with classifier-free guidance; returns (B, 3, H, W) in [0, 1].

        label_B: LongTensor (B,), an int for all (negative = unconditional), or None (uniform random).
        g_seed: an int seeds one generator for the batch (official); a list of B ints one per row, so a
        row's image does not depend on the batch it is in.
        Implicit iterations per scale: `schedule`, else the official linspace(iter_left, iter_right).
        fill_forward=False attends, as the official code, to no earlier scale at an iteration index
        that scale never ran. With return_stats, returns (images, SampleStats).
        solver: how VIAR solves each scale (None: the plain iteration; SolverSpec('anderson'), see
        models/solver.py and docs/SPEED.md); VAR ignores it.
        fast: the same maths with other rounding (VIAR computes its input injection once per scale) and top-k
        draws over the candidates only (`sample_ops.sample_candidates`: the same distribution, another RNG stream);
        the default False keeps the official arithmetic and draws bit for bit. Usually set by
        utils.sample.compile_util, as are scale_step (a compiled `scale_logits`, run on every scale that
        `scale_slots` can capture) and alloc (where the KV caches' buffers come from).
        """
        K = len(self.patch_nums)
        schedule = schedule or IterSchedule(linspace_iters(iter_left, iter_right, K))
        if len(schedule.counts) != K:
            raise ValueError(f'the schedule lists {len(schedule.counts)} iteration counts for a model of {K} scales: '
                             f'give one count per scale (schedules.constant(n, {K}), decreasing(a, b, {K}), ...)')
        dev = self.lvl_1L.device
        rng = sample_ops.make_rng(g_seed, dev)
        if isinstance(rng, list) and len(rng) != B:
            raise ValueError(f'g_seed lists one seed per row: got {len(rng)} seeds for B={B}')
        if label_B is None:
            label_B = sample_ops.random_labels(B, self.num_classes, rng, dev)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=dev)
        label_B = label_B.to(dev)

        # everything that does not change across scales, once per call. R rows: the conditional half,
        # then the unconditional one (R = 2B); cfg == 0 never looks at the latter, so it runs R = B rows
        guided = cfg != 0
        label_R = torch.cat((label_B, torch.full_like(label_B, self.num_classes))) if guided else label_B
        sos = cond_RD = self.class_emb(label_R)
        R = cond_RD.shape[0]
        ada = self.block_modulations(cond_RD)
        ada_head = self.head_nm.modulation(cond_RD)
        lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        state = self.new_infer_state(schedule, fill_forward, solver, fast, alloc)
        like = cached_layout(self.backbone_blocks()[0], R, dev)
        stats = SampleStats()
        # more_smooth reads the logits the exact sampler filters in place (as official); the candidates one does not
        sample = sample_ops.sample_candidates if fast and not more_smooth else sample_ops.sample_top_k_top_p_

        quant = self.vae_quant_proxy[0]
        next_RlC = sos.unsqueeze(1).expand(R, self.first_l, -1) + self.pos_start.expand(R, self.first_l, -1) \
            + lvl_pos_1LC[:, :self.first_l]
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1 if self.num_stages_minus_1 else 1.0
            guide_ratio = sample_ops.cfg_ratio(cfg, si, K) if guided else None
            slots = self.scale_slots(state, si, like, schedule) if scale_step is not None else None
            if slots is not None:
                logits_BlV, residual = scale_step(next_RlC, ada, ada_head, cond_RD, slots, guide_ratio)
                # a replayed CUDA graph overwrites its outputs at its next replay: the residual is read at the end
                self.end_slots(state, slots, None if residual is None else residual.clone(), stats)
            else:
                logits_BlV = self.get_logits(self.infer_backbone(next_RlC, ada, state, si, schedule, stats), cond_RD,
                                             ada_head, guide_ratio)
            idx_Bl = sample(logits_BlV, top_k=top_k, top_p=top_p, rng=rng)
            if edit is not None:
                idx_Bl = torch.where(edit.keep_Bl[si], edit.gt_idx_Bl[si], idx_Bl)
            if more_smooth and edit is None:   # visualisation only, never for FID
                probs_BlV = sample_ops.gumbel_softmax(logits_BlV.mul(1 + ratio), sample_ops.smooth_tau(ratio), rng)
                h_BlCv = probs_BlV @ quant.embedding.weight.unsqueeze(0)
            else:
                h_BlCv = quant.embedding(idx_Bl)
            h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_BCvhw = quant.get_next_autoregressive_input(si, K, f_hat, h_BCvhw)
            if si != self.num_stages_minus_1:
                b, e = self.begin_ends[si + 1]
                next_BlC = self.word_embed(next_BCvhw.view(B, self.Cvae, -1).transpose(1, 2)) + lvl_pos_1LC[:, b:e]
                next_RlC = next_BlC.repeat(2, 1, 1) if guided else next_BlC   # both halves see the same tokens
        stats.kv_cache_bytes = state_nbytes(state)
        stats.residuals = [None if r is None else float(r) for r in stats.residuals]
        # the KV caches and the last scale's activations are dead: free them before the decode, whose
        # full-resolution activations would otherwise stack on top of them (the official code drops its caches too)
        del state, slots, logits_BlV, h_BlCv, ada, ada_head
        img = self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)
        return (img, stats) if return_stats else img

    # ---- initialisation ----
    def reset_embeddings(self):
        """Constructor-time init of the position/start embeddings (std sqrt(1/(3C)), as official)."""
        std = math.sqrt(1 / self.C / 3)
        for p in (self.pos_start, self.pos_1LC, self.class_emb.weight, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=std)

    def reset_buffers(self):
        """Recompute the buffers (needed after building on the meta device)."""
        self.lvl_1L.copy_(level_ids(self.patch_nums).view(1, self.L))
        self.attn_bias_for_masking.copy_(block_causal_bias(self.patch_nums))
        for b in self.backbone_blocks():
            b.attn.reset_special()

    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=0.02, conv_std_or_gain=0.02):
        """Official init: truncated normal Linear/Embedding, zero biases, small head, near-identity AdaLN gates."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():   # the official cases of affine LayerNorms and padding indices never occur here
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.data.zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for block in self.backbone_blocks():
            init_block_(block, self.depth, init_adaln, init_adaln_gamma)

    def extra_repr(self) -> str:
        return f'drop_path_rate={self.drop_path_rate:g}'


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 where the official code calls .float() (half types and float32); float64 stays float64, so a
    model in float64 computes every step in float64 (the machine-independent references of the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cached_layout(block: AdaLNSelfAttn, R: int, device: torch.device) -> tuple:
    """(rows, heads, head dim, dtype, device) of the keys/values `block` caches: autocast's dtype where autocast
    is on, else its weights'."""
    attn, dev = block.attn, device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else attn.mat_qkv.weight.dtype
    return R, attn.num_heads, attn.head_dim, dtype, device


def state_nbytes(state) -> int:
    """Bytes held by every KV cache reachable from an inference state."""
    if hasattr(state, 'nbytes'):   # a KVCache or IterKVCaches
        return state.nbytes()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


class VAR(VARBase):
    """Explicit VAR: `depth` distinct AdaLN blocks."""

    def build_backbone(self):
        self.blocks = nn.ModuleList([self._make_block(i) for i in range(self.depth)])

    def backbone_blocks(self) -> List[AdaLNSelfAttn]:
        return list(self.blocks)

    def train_backbone(self, x_BLC, ada, attn_bias, jfb_iters, path_keep_K2B=None):
        keep = self._call_keeps(path_keep_K2B, len(self.blocks))
        for k, (block, a) in enumerate(zip(self.blocks, ada)):
            x_BLC = self._checkpointed(block, x_BLC, a, attn_bias, None, keep(k))
        return x_BLC

    def new_infer_state(self, schedule, fill_forward, solver=None, fast=False, alloc=new_buffer):
        return [KVCache(self.L, alloc) for _ in self.blocks]

    def infer_backbone(self, x_BlC, ada, state, si, schedule, stats):
        for block, a, kv in zip(self.blocks, ada, state):   # kv: a KVCache, or a KVSlot when captured
            x_BlC = block(x_BlC, a, None, kv)
        return x_BlC

    def scale_slots(self, state, si, like, schedule):
        return [reserve_slot(kv, self.patch_nums[si] ** 2, like) for kv in state]

    def slot_backbone(self, x_RlC, ada, slots):
        return self.infer_backbone(x_RlC, ada, slots, None, None, None), None


def __getattr__(name: str):
    """`models.var.VARHF` (the official Hub class name) from models/hub.py, imported on first use so that
    huggingface_hub stays out of the import of the models."""
    if name == 'VARHF':
        from models.hub import VARHF
        return VARHF
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
