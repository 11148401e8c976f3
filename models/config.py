"""The architecture of a (VQVAE, VAR/VIAR) pair as one typed config, and how to read it off the weights.

`ModelSpec` is what a slim export stores as its 'config' and what every script builds from. The
official files carry no config: `spec_from_state_dict` reads every size the weights determine (kind,
depth of VAR, width, heads, pre/post blocks of VIAR, classes, vocabulary, code dim, shared AdaLN,
the scale pyramid from the length of `pos_1LC`) and takes the rest from a fallback spec.
"""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from models.layout import PYRAMIDS, num_tokens

ARCH_FIELDS = ('depth', 'use_implicit', 'pre_depth', 'post_depth', 'embed_dim', 'num_heads', 'patch_nums', 'V',
               'Cvae', 'vae_ch', 'vae_ch_mult', 'vae_num_res_blocks', 'num_classes', 'shared_aln', 'attn_l2_norm')


@dataclass
class ModelSpec:
    """Everything needed to rebuild a VQVAE + transformer pair (official ImageNet 256 px sizes by default)."""
    depth: int = 16
    use_implicit: bool = False
    pre_depth: int = 5
    post_depth: int = 5
    embed_dim: Optional[int] = None     # default 64 * depth
    num_heads: Optional[int] = None     # default depth
    patch_nums: Tuple[int, ...] = PYRAMIDS[256]
    V: int = 4096
    Cvae: int = 32
    vae_ch: int = 160
    vae_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    vae_num_res_blocks: int = 2
    num_classes: int = 1000
    shared_aln: bool = False
    attn_l2_norm: bool = True

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
        return self.patch_nums[-1] * 2 ** (len(self.vae_ch_mult) - 1)

    def summary(self) -> str:
        """'a VIAR (depth 6, width 96, 4 heads, pre 1, post 1, 10 classes)'."""
        blocks = f', pre {self.pre_depth}, post {self.post_depth}' if self.use_implicit else ''
        extra = ', shared AdaLN' if self.shared_aln else ''
        return (f'a {self.kind} (depth {self.depth}, width {self.width}, {self.heads} heads{blocks}{extra}, '
                f'{self.num_classes} classes)')

    # ---- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ModelSpec':
        """Inverse of to_dict; unknown keys (other versions) are dropped, lists become tuples."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    # ---- checks and descriptions
    def validate(self):
        """Raise ValueError with the fix when the sizes cannot build a model."""
        if self.depth < 1:
            raise ValueError(f'depth must be >= 1, got {self.depth}')
        if self.width % self.heads:
            raise ValueError(f'width {self.width} must be divisible by heads {self.heads} (--width/--heads)')
        if self.use_implicit and (self.pre_depth < 0 or self.post_depth < 0
                                  or self.pre_depth + self.post_depth >= self.depth):
            raise ValueError(f'VIAR needs pre_depth + post_depth < depth, i.e. 2 * --p_depth < --depth for train.py '
                             f'(got {self.pre_depth} + {self.post_depth} with depth {self.depth}): lower --p_depth '
                             f'(--pre_depth/--post_depth) or raise --depth')
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or not self.patch_nums or self.patch_nums[0] < 1:
            raise ValueError(f'patch_nums must be strictly increasing positive sides, got {self.patch_nums}')
        if self.num_classes < 1 or self.V < 2 or self.Cvae < 1:
            raise ValueError('num_classes, V and Cvae must be positive (V >= 2)')

    def flags(self, against: Optional['ModelSpec'] = None) -> str:
        """The sampling scripts' flags that build this spec (only those differing from `against`, if given)."""
        ref = against or ModelSpec()
        out = [f'--depth {self.depth}', f'--use_implicit {self.use_implicit}']
        if self.use_implicit:
            out += [f'--pre_depth {self.pre_depth}', f'--post_depth {self.post_depth}']
        if self.width != 64 * self.depth or (against is not None and self.width != ref.width):
            out.append(f'--width {self.width}')
        if self.heads != self.depth or (against is not None and self.heads != ref.heads):
            out.append(f'--heads {self.heads}')
        for name, flag in (('patch_nums', 'patch_nums'), ('V', 'V'), ('Cvae', 'Cvae'), ('num_classes', 'num_classes')):
            if getattr(self, name) != getattr(ref, name):
                value = getattr(self, name)
                out.append(f'--{flag} ' + (','.join(map(str, value)) if isinstance(value, tuple) else str(value)))
        return ' '.join(out)

    def differences(self, other: 'ModelSpec', names=ARCH_FIELDS) -> List[Tuple[str, Any, Any]]:
        """(field, this value, other value) for every architecture field that differs (width/heads resolved)."""
        out = []
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if name == 'embed_dim':
                a, b = self.width, other.width
            elif name == 'num_heads':
                a, b = self.heads, other.heads
            elif name in ('pre_depth', 'post_depth') and not (self.use_implicit and other.use_implicit):
                continue
            if a != b:
                out.append((name, a, b))
        return out

    # ---- building
    def build(self, device='cpu', **init):
        """(vae, var) for this spec, randomly initialised as the official init does.

        init: training-only options of `models.build_vae_var` (init_adaln, init_std, cond_drop_rate,
        drop_path_rate, jfb_no_grad, jfb_with_grad, ...).
        """
        from models import build_vae_var
        self.validate()
        return build_vae_var(device, patch_nums=self.patch_nums, V=self.V, Cvae=self.Cvae, ch=self.vae_ch,
                             num_classes=self.num_classes, depth=self.depth, shared_aln=self.shared_aln,
                             attn_l2_norm=self.attn_l2_norm, use_implicit=self.use_implicit, pre_depth=self.pre_depth,
                             post_depth=self.post_depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                             vae_ch_mult=self.vae_ch_mult, vae_num_res_blocks=self.vae_num_res_blocks, **init)


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
    """VIAR key -> the VAR key it is initialised from (None: keeps its fresh init, i.e. the projection).

    pre_blocks.i <- blocks.i; implicit_block <- blocks.(var_depth // 2); post_blocks.j <- blocks.(var_depth -
    post_depth + j); every other key (embeddings, shared AdaLN, head) from the same name.
    """
    if pre_depth + post_depth > var_depth:
        raise ValueError(f'{pre_depth} pre + {post_depth} post blocks need a VAR of depth >= {pre_depth + post_depth}, '
                         f'got depth {var_depth}')
    out = {}
    for key in viar_keys:
        if key.startswith('implicit_block_projection.'):
            out[key] = None
        elif key.startswith('pre_blocks.'):
            i, rest = key[len('pre_blocks.'):].split('.', 1)
            out[key] = f'blocks.{int(i)}.{rest}'
        elif key.startswith('post_blocks.'):
            j, rest = key[len('post_blocks.'):].split('.', 1)
            out[key] = f'blocks.{var_depth - post_depth + int(j)}.{rest}'
        elif key.startswith('implicit_block.'):
            out[key] = f'blocks.{var_depth // 2}.{key[len("implicit_block."):]}'
        else:
            out[key] = key
    return out


def pyramid_for(L: int, K: int, fallback: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """The scale sides with K scales and L tokens: the fallback's if it fits, else a known official pyramid."""
    if len(fallback) == K and num_tokens(fallback) == L:
        return tuple(fallback)
    for pn in PYRAMIDS.values():
        if len(pn) == K and num_tokens(pn) == L:
            return pn
    return None


def spec_from_state_dict(sd: Mapping[str, Any], fallback: Optional[ModelSpec] = None) -> ModelSpec:
    """The transformer's architecture as far as its weights tell; every other field from `fallback`.

    VIAR files do not store the depth of the explicit stack the implicit block replaces: it is the
    fallback's when the widths agree, else the official sizing (width = 64 * depth).
    """
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
    """The transformer architecture of a built VAR/VIAR (its depth and scales from the object, not guessed)."""
    fallback = ModelSpec(depth=var.depth, patch_nums=tuple(var.patch_nums), num_heads=var.num_heads,
                         embed_dim=var.C, V=var.V, Cvae=var.Cvae, num_classes=var.num_classes)
    return spec_from_state_dict(var.state_dict(), fallback)


def vae_arch_from_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """The tokenizer's sizes in ModelSpec names: V, Cvae, vae_ch, vae_ch_mult, vae_num_res_blocks."""
    V, Cvae = sd['quantize.embedding.weight'].shape
    ch = sd['encoder.conv_in.weight'].shape[0]
    levels = _count(sd, 'encoder.down')
    mult = tuple(sd[f'encoder.down.{i}.block.0.conv2.weight'].shape[0] // ch for i in range(levels))
    res_blocks = _count(sd, 'encoder.down.0.block')
    return dict(V=V, Cvae=Cvae, vae_ch=ch, vae_ch_mult=mult, vae_num_res_blocks=res_blocks)
