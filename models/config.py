"""The architecture of a (VQVAE, VAR/VIAR) pair as one typed config, and how to read it off the weights.

`ModelSpec` declares every architecture field once; slim exports store it as their 'config' and the training and
sampling command lines are generated from it (utils/arch_flags.py). The official files carry no config:
`spec_from_state_dict` reads every size their weights determine and takes the rest from a fallback spec.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from models import build_vae_var
from models.layout import PYRAMIDS, num_tokens


def _spec_field(default, doc: str, part: str = 'transformer'):
    """A ModelSpec field: its default, what it means, and which model it shapes ('transformer' or 'tokenizer')."""
    return field(default=default, metadata=dict(doc=doc, part=part))


@dataclass
class ModelSpec:
    """Everything needed to rebuild a VQVAE + transformer pair (official ImageNet 256 px sizes by default).
    Transformer fields go to the VAR/VIAR constructor under their own names (one only VIAR takes is left out for
    VAR); tokenizer fields build the VQVAE."""
    depth: int = _spec_field(16, 'nominal depth: the default width (64 x depth) and heads (depth), init scaling and '
                                 'drop path; for VIAR, the explicit stack its implicit block replaces')
    use_implicit: bool = _spec_field(False, 'VIAR (pre-blocks, one weight-shared implicit block, post-blocks) '
                                            'instead of VAR')
    pre_depth: int = _spec_field(5, 'VIAR: explicit blocks before the implicit block')
    post_depth: int = _spec_field(5, 'VIAR: explicit blocks after the implicit block')
    embed_dim: Optional[int] = _spec_field(None, 'embedding width (64 x depth when not set)')
    num_heads: Optional[int] = _spec_field(None, 'attention heads (depth when not set)')
    patch_nums: Tuple[int, ...] = _spec_field(PYRAMIDS[256], 'token-map side of every scale (256 px: 1,2,3,4,5,6,8,'
                                                             '10,13,16)')
    num_classes: int = _spec_field(1000, 'classes (one more row in class_emb: the null class of guidance)')
    shared_aln: bool = _spec_field(False, 'one AdaLN projection shared by all blocks (VAR-d36-s)')
    attn_l2_norm: bool = _spec_field(True, 'L2-normalised attention with a learnable scale per head')
    V: int = _spec_field(4096, 'tokenizer vocabulary', 'tokenizer')
    Cvae: int = _spec_field(32, 'tokenizer code dimension', 'tokenizer')
    vae_ch: int = _spec_field(160, 'tokenizer base channels', 'tokenizer')
    vae_ch_mult: Tuple[int, ...] = _spec_field((1, 1, 2, 2, 4), 'tokenizer channel multipliers per level (image '
                                                                '= last scale x 2^(levels - 1))', 'tokenizer')
    vae_num_res_blocks: int = _spec_field(2, 'tokenizer res blocks per level', 'tokenizer')

    # ---- derived
    @property
    def kind(self) -> str:
        """'VIAR' or 'VAR'."""
        return 'VIAR' if self.use_implicit else 'VAR'

    @property
    def width(self) -> int:
        return self.embed_dim or 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def image_px(self) -> int:
        """Image side: last scale side times the tokenizer's downsampling."""
        return self.patch_nums[-1] * self.downsample

    @property
    def downsample(self) -> int:
        """Pixels per token at the last scale (the official --patch_size)."""
        return 2 ** (len(self.vae_ch_mult) - 1)

    # ---- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ModelSpec':
        """Inverse of to_dict; unknown keys (other versions) are dropped, lists become tuples."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    # ---- checks and comparisons
    def validate(self):
        """Raise ValueError with the fix, in field names, when the sizes cannot build a model
        (utils.arch_flags.check_spec says it in flags)."""
        if self.depth < 1:
            raise ValueError(f'depth must be >= 1, got {self.depth}')
        if self.width % self.heads:
            raise ValueError(f'width {self.width} must be divisible by heads {self.heads} (embed_dim, num_heads)')
        if self.use_implicit and (self.pre_depth < 0 or self.post_depth < 0
                                  or self.pre_depth + self.post_depth >= self.depth):
            raise ValueError(f'VIAR needs pre_depth + post_depth < depth (got {self.pre_depth} + {self.post_depth} '
                             f'with depth {self.depth}): lower pre_depth and post_depth or raise depth')
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or not self.patch_nums or self.patch_nums[0] < 1:
            raise ValueError(f'patch_nums must be strictly increasing positive sides, got {self.patch_nums}')
        if self.num_classes < 1 or self.V < 2 or self.Cvae < 1:
            raise ValueError('num_classes, V and Cvae must be positive (V >= 2)')

    def value(self, name: str) -> Any:
        """A field's effective value: width and heads resolved; VIAR's block counts None for a VAR."""
        if name in ('pre_depth', 'post_depth') and not self.use_implicit:
            return None
        return {'embed_dim': self.width, 'num_heads': self.heads}.get(name, getattr(self, name))

    def differences(self, other: 'ModelSpec', names: Optional[Sequence[str]] = None) -> List[Tuple[str, Any, Any]]:
        """(field, this value, other value) for every field (of `names`, default all) whose effective value differs."""
        out = []
        for name in names or field_names():
            a, b = self.value(name), other.value(name)
            if a != b and None not in (a, b):   # None: a VAR's pre/post blocks, whose kind differs already
                out.append((name, a, b))
        return out

    # ---- building
    def build(self, device='cpu', **init):
        """(vae, var) for this spec, randomly initialised as the official init does; init: training-only options of
        `models.build_vae_var` (init_adaln, init_std, cond_drop_rate, drop_path_rate, jfb_no_grad, ...)."""
        self.validate()
        transformer = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata['part'] == 'transformer'}
        return build_vae_var(device, V=self.V, Cvae=self.Cvae, ch=self.vae_ch, vae_ch_mult=self.vae_ch_mult,
                             vae_num_res_blocks=self.vae_num_res_blocks, **transformer, **init)


def field_names(part: Optional[str] = None) -> Tuple[str, ...]:
    """The ModelSpec fields, in declaration order (only those shaping `part`: 'transformer' or 'tokenizer')."""
    return tuple(f.name for f in fields(ModelSpec) if part is None or f.metadata['part'] == part)


# ---------------------------------------------------------------- reading sizes off the weights

def _count(sd: Mapping[str, Any], prefix: str) -> int:
    """Distinct indices right after `prefix.` in the keys (e.g. blocks in 'blocks.3.attn...')."""
    return len({k[len(prefix) + 1:].split('.')[0] for k in sd if k.startswith(prefix + '.')})


def state_dict_kind(sd: Mapping[str, Any]) -> str:
    """'vae', 'VIAR', 'VAR' or 'unknown' from the keys alone."""
    if 'quantize.embedding.weight' in sd and 'encoder.conv_in.weight' in sd:
        return 'vae'
    if 'class_emb.weight' not in sd:
        return 'unknown'
    return 'VIAR' if any(k.startswith('implicit_block.') for k in sd) else 'VAR'


def var_to_viar_names(viar_keys: Sequence[str], var_depth: int, pre_depth: int, post_depth: int
                      ) -> Dict[str, Optional[str]]:
    """VIAR key -> the VAR key it is initialised from (None: the projection keeps its fresh init): pre_blocks.i <-
    blocks.i; implicit_block <- blocks.(var_depth // 2); post_blocks.j <- blocks.(var_depth - post_depth + j); every
    other key (embeddings, shared AdaLN, head) from the same name."""
    if pre_depth + post_depth > var_depth:
        raise ValueError(f'{pre_depth} pre + {post_depth} post blocks need a VAR of depth >= {pre_depth + post_depth}, '
                         f'got depth {var_depth}')
    first_block = {'pre_blocks': 0, 'post_blocks': var_depth - post_depth}
    out = {}
    for key in viar_keys:
        head, _, rest = key.partition('.')
        if head == 'implicit_block_projection':
            out[key] = None
        elif head == 'implicit_block':
            out[key] = f'blocks.{var_depth // 2}.{rest}'
        elif head in first_block:
            i, rest = rest.split('.', 1)
            out[key] = f'blocks.{first_block[head] + int(i)}.{rest}'
        else:
            out[key] = key
    return out


def pyramid_for(L: int, K: int, fallback: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """The scale sides with K scales and L tokens: the fallback's if it fits, else a known official pyramid, else
    the only strictly increasing one there is (None when there are several, or none).

    >>> pyramid_for(30, 4, ())
    (1, 2, 3, 4)
    """
    for pn in (tuple(fallback), *PYRAMIDS.values()):
        if len(pn) == K and num_tokens(pn) == L:
            return pn
    found = increasing_sides(L, K, limit=2)
    return found[0] if len(found) == 1 else None


def increasing_sides(L: int, K: int, limit: int = 2, budget: int = 100_000) -> List[Tuple[int, ...]]:
    """Up to `limit` strictly increasing sequences of K positive sides whose squares sum to L (a depth-first search
    that gives up, returning what it found, after `budget` steps)."""
    out: List[Tuple[int, ...]] = []
    steps = [0]

    def extend(prefix: Tuple[int, ...], rest: int):
        steps[0] += 1
        if len(out) >= limit or steps[0] > budget:
            return
        left = K - len(prefix)
        if left == 0:
            if rest == 0:
                out.append(prefix)
            return
        s = (prefix[-1] if prefix else 0) + 1
        while sum((s + i) ** 2 for i in range(left)) <= rest:   # the smallest sides still fit
            extend(prefix + (s,), rest - s * s)
            s += 1

    extend((), L)
    return out


def spec_from_state_dict(sd: Mapping[str, Any], fallback: Optional[ModelSpec] = None) -> ModelSpec:
    """The transformer's architecture as far as its weights tell; every other field from `fallback`. A VIAR file
    does not store the depth of the stack its implicit block replaces: the fallback's when the widths agree, else
    the official sizing (width = 64 * depth)."""
    fb = fallback or ModelSpec()
    kind = state_dict_kind(sd)
    if kind not in ('VAR', 'VIAR'):
        raise ValueError(f'not a VAR/VIAR state dict (kind {kind})')
    width = sd['class_emb.weight'].shape[1]
    heads_key = next((k for k in sd if k.endswith('attn.scale_mul_1H11')), None)
    heads = sd[heads_key].shape[1] if heads_key else fb.heads
    vals = dict(fb.to_dict(), use_implicit=kind == 'VIAR', embed_dim=width, num_heads=heads,
                num_classes=sd['class_emb.weight'].shape[0] - 1, attn_l2_norm=heads_key is not None,
                shared_aln=any(k.startswith('shared_ada_lin.') for k in sd))
    if 'head.weight' in sd:
        vals['V'] = sd['head.weight'].shape[0]
    if 'word_embed.weight' in sd:
        vals['Cvae'] = sd['word_embed.weight'].shape[1]
    if 'pos_1LC' in sd and 'lvl_embed.weight' in sd:
        pn = pyramid_for(sd['pos_1LC'].shape[1], sd['lvl_embed.weight'].shape[0], fb.patch_nums)
        vals['patch_nums'] = pn or fb.patch_nums
    if kind == 'VIAR':
        vals.update(pre_depth=_count(sd, 'pre_blocks'), post_depth=_count(sd, 'post_blocks'))
        if fb.width != width:
            vals['depth'] = width // 64 if width % 64 == 0 else heads
    else:
        vals['depth'] = _count(sd, 'blocks')
    spec = ModelSpec.from_dict(vals)
    if spec.embed_dim == 64 * spec.depth:
        spec.embed_dim = None
    if spec.num_heads == spec.depth:
        spec.num_heads = None
    return spec


def spec_of_model(var) -> ModelSpec:
    """The transformer architecture of a built VAR/VIAR: what its weights show, and every field the model holds
    under the field's own name (its depth, scales, VIAR's block counts, ...)."""
    fallback = ModelSpec(depth=var.depth, embed_dim=var.C, num_heads=var.num_heads, patch_nums=tuple(var.patch_nums),
                         V=var.V, Cvae=var.Cvae)
    spec = spec_from_state_dict(var.state_dict(), fallback)
    held = {name: getattr(var, name) for name in field_names('transformer') if name not in ('embed_dim', 'num_heads')
            and hasattr(var, name)}
    return ModelSpec.from_dict(dict(spec.to_dict(), **held))


def vae_arch_from_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """The tokenizer's sizes in ModelSpec names: V, Cvae, vae_ch, vae_ch_mult, vae_num_res_blocks."""
    V, Cvae = sd['quantize.embedding.weight'].shape
    ch = sd['encoder.conv_in.weight'].shape[0]
    levels = _count(sd, 'encoder.down')
    mult = tuple(sd[f'encoder.down.{i}.block.0.conv2.weight'].shape[0] // ch for i in range(levels))
    res_blocks = _count(sd, 'encoder.down.0.block')
    return dict(V=V, Cvae=Cvae, vae_ch=ch, vae_ch_mult=mult, vae_num_res_blocks=res_blocks)
