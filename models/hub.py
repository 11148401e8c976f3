"""Hub folders: VAR / VIAR as `PyTorchModelHubMixin` classes with the official `VARHF` config keys, and the reader
that turns a folder or repo id into the slim export it amounts to (docs/VAR_COMPAT.md, docs/CHECKPOINTS.md).

    model = hub_model(vae, var, spec)             # a VARHF (a VAR) or a VIARHF (a VIAR) holding these weights
    model.save_pretrained('var-d16')              # config.json, model.safetensors, vae.safetensors
    model = VARHF.from_pretrained('var-d16')      # the class the config names, transformer loaded strictly
    export = read_folder('someone/var-d16')       # a folder or repo id as utils.model_io loads a slim export
"""
import inspect
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import safetensors.torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, snapshot_download
from huggingface_hub.constants import CONFIG_NAME
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from models.config import ModelSpec, spec_of_model
from models.var import VAR
from models.viar import VIAR
from models.vqvae import VQVAE
from utils.atomic import atomic_path, write_json_atomic
from utils.checkpoint import CheckpointError, load_var_weights, payload_bytes, read_checkpoint

log = logging.getLogger(__name__)

WEIGHTS_FILE = 'model.safetensors'
VAE_FILE = 'vae.safetensors'
RECORDED_FILE = 'recorded.json'   # {'sampling': {...}, 'class_names': [...]}: what the training run recorded
# VQVAE keywords the official tokenizer does not take: in vae_kwargs only when they differ
_VAE_OFFICIAL_FIXED = dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)


class HubLoadError(CheckpointError, OSError):
    """A folder or repo id that cannot be read (offline, missing, or without a config)."""


_VAR_KEYWORDS = [k for k in inspect.signature(VAR.__init__).parameters if k not in ('self', 'vae_local')]


def _var_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """VAR's constructor arguments from a VARHF / VIARHF constructor's locals(): the VQVAE built from `vae_kwargs`
    and the official VAR keywords (flash/fused are the kernels' business, not the model's). JSON gives lists."""
    vae_kw = {k: tuple(v) if k in ('v_patch_nums', 'ch_mult') else v for k, v in args['vae_kwargs'].items()}
    return dict({k: args[k] for k in _VAR_KEYWORDS}, vae_local=VQVAE(**vae_kw), patch_nums=tuple(args['patch_nums']))


class _HubIO(PyTorchModelHubMixin):
    """Saving and loading shared by VARHF and VIARHF. An official folder has no tokenizer: tokenizer_loaded stays
    False until utils.checkpoint.load_vae_weights(model.vae_proxy[0], 'vae_ch160v4096z32.pth')."""

    tokenizer_loaded = False
    recorded: Dict[str, Any] = {}   # RECORDED_FILE's contents

    def _save_pretrained(self, save_directory):
        for name, module in ((WEIGHTS_FILE, self), (VAE_FILE, self.vae_proxy[0])):
            sd = {k: v.contiguous() for k, v in module.state_dict().items()}
            with atomic_path(os.path.join(save_directory, name), need=payload_bytes(sd)) as tmp:
                safetensors.torch.save_file(sd, tmp)
        if self.recorded:
            write_json_atomic(self.recorded, os.path.join(save_directory, RECORDED_FILE))

    def save_pretrained(self, save_directory, *, model_card_kwargs=None, **kw):
        """The mixin's save; the model card's command samples `save_directory` unless told another name."""
        card = {'name': str(save_directory), **(model_card_kwargs or {})}
        return super().save_pretrained(save_directory, model_card_kwargs=card, **kw)

    def push_to_hub(self, repo_id, *, model_card_kwargs=None, **kw):
        """The mixin's upload; the model card's command samples `repo_id`."""
        return super().push_to_hub(repo_id, model_card_kwargs={'name': repo_id, **(model_card_kwargs or {})}, **kw)

    def generate_model_card(self, *args, name: str = 'FOLDER', **kwargs) -> ModelCard:
        return ModelCard(model_card(self, name))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kw):
        """The mixin's loader; an unreachable repo id fails with one line naming it."""
        model_id = str(pretrained_model_name_or_path)
        try:
            return super().from_pretrained(model_id, **kw)
        except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError) as e:
            raise HubLoadError(f'{model_id}: not a local folder, and its files cannot be fetched from the Hub '
                               f'({type(e).__name__}; offline, or no such repo)') from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         config: Optional[Dict[str, Any]] = None, map_location: str = 'cpu', strict: bool = True,
                         **model_kwargs):
        if config is None:
            raise HubLoadError(f'{model_id}: no config.json (a VARHF folder holds config.json and {WEIGHTS_FILE})')
        model_cls, keys = _hub_class(model_id, config)
        if issubclass(cls, VIARHF) and model_cls is VARHF:   # VARHF reads both kinds; VIARHF only its own
            raise HubLoadError(f'{model_id} holds a VAR (no use_implicit in config.json): load it with VARHF')
        model = model_cls(**{**config, **{k: v for k, v in model_kwargs.items() if k in keys}})
        folder = model_id if os.path.isdir(model_id) else download_repo(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
            local_files_only=local_files_only)
        files = _read_files(folder, model_id)
        load_var_weights(model, files['model'], strict=strict, where=os.path.join(folder, WEIGHTS_FILE))
        if 'vae' in files:
            model.vae_proxy[0].load_state_dict(files['vae'], strict=True)
            model.tokenizer_loaded = True
        else:
            log.warning('%s holds no tokenizer weights (an official VARHF folder): load them with '
                        'utils.checkpoint.load_vae_weights(model.vae_proxy[0], "vae_ch160v4096z32.pth")', model_id)
        model.recorded = files.get('recorded', {})
        return model.to(map_location).eval()


def _hub_class(model_id: str, config: Dict[str, Any]) -> Tuple[type, set]:
    """The class a config.json names (VIARHF where it says use_implicit, else VARHF) and its constructor keywords;
    a config key outside them is a HubLoadError naming it."""
    model_cls = VIARHF if config.get('use_implicit') else VARHF
    keys = set(model_cls._hub_mixin_init_parameters) - {'self'}
    unknown = sorted(set(config) - keys)
    if unknown:   # a misspelt or foreign key would otherwise fall back to a default without a word
        raise HubLoadError(f'{model_id}/config.json: keys {unknown} are not {model_cls.__name__} keywords')
    return model_cls, keys


def _read_json(path: str) -> Dict[str, Any]:
    """The JSON object in a folder's file; anything else is a one-line HubLoadError."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:
        raise HubLoadError(f'{path} is not valid JSON ({e}); download or export the folder again') from None
    if not isinstance(obj, dict):
        raise HubLoadError(f'{path} holds no JSON object; download or export the folder again')
    return obj


class VARHF(VAR, _HubIO):
    """VAR with the official `VARHF` constructor (its VQVAE from `vae_kwargs`); from_pretrained returns a VIARHF
    where config.json says `use_implicit`."""

    def __init__(self, vae_kwargs, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available=True, fused_if_available=True):
        super().__init__(**_var_args(locals()))


class VIARHF(VIAR, _HubIO):
    """VIAR with VARHF's keywords plus the official VAR constructor's VIAR keywords."""

    def __init__(self, vae_kwargs, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_eps=1e-6, shared_aln=False,
                 cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available=True, fused_if_available=True,
                 use_implicit=True, pre_depth=5, post_depth=5,
                 implicit_no_grad_min_iters=0, implicit_no_grad_max_iters=10,
                 implicit_with_grad_min_iters=1, implicit_with_grad_max_iters=12):
        if not use_implicit:
            raise ValueError('VIARHF is the implicit model (use_implicit=True); VARHF builds a VAR')
        super().__init__(pre_depth=pre_depth, post_depth=post_depth,
                         jfb_no_grad=(implicit_no_grad_min_iters, implicit_no_grad_max_iters),
                         jfb_with_grad=(implicit_with_grad_min_iters, implicit_with_grad_max_iters),
                         **_var_args(locals()))


def hub_config(spec, var) -> Dict[str, Any]:
    """The VARHF / VIARHF keywords of a ModelSpec and its model (which holds drop path, class dropout, S-JFB)."""
    sizes = dict(ch_mult=tuple(spec.vae_ch_mult), num_res_blocks=spec.vae_num_res_blocks)
    vae_kwargs = dict(vocab_size=spec.V, z_channels=spec.Cvae, ch=spec.vae_ch, share_quant_resi=4,
                      v_patch_nums=tuple(spec.patch_nums), test_mode=True,
                      **{k: v for k, v in sizes.items() if v != _VAE_OFFICIAL_FIXED[k]})
    cfg = dict(vae_kwargs=vae_kwargs, num_classes=spec.num_classes, depth=spec.depth, embed_dim=spec.width,
               num_heads=spec.heads, shared_aln=spec.shared_aln, attn_l2_norm=spec.attn_l2_norm,
               patch_nums=tuple(spec.patch_nums),
               drop_path_rate=var.drop_path_rate, cond_drop_rate=var.cond_drop_rate)
    if spec.use_implicit:
        no_grad, with_grad = var.jfb_no_grad, var.jfb_with_grad
        cfg.update(use_implicit=True, pre_depth=spec.pre_depth, post_depth=spec.post_depth,
                   implicit_no_grad_min_iters=no_grad[0], implicit_no_grad_max_iters=no_grad[1],
                   implicit_with_grad_min_iters=with_grad[0], implicit_with_grad_max_iters=with_grad[1])
    return cfg


def hub_model(vae: VQVAE, var, spec, sampling: Optional[Dict[str, Any]] = None, class_names=None) -> '_HubIO':
    """A VARHF or VIARHF holding copies of `vae`'s and `var`'s weights; `sampling` (checked sampling defaults) and
    `class_names` go into its RECORDED_FILE."""
    cfg = hub_config(spec, var)
    model = (VIARHF if spec.use_implicit else VARHF)(**cfg)
    model.load_state_dict(var.state_dict(), strict=True)
    model.vae_proxy[0].load_state_dict(vae.state_dict(), strict=True)
    model.tokenizer_loaded = True
    model.recorded = {k: v for k, v in (('sampling', sampling), ('class_names', class_names)) if v}
    return model.to(next(var.parameters()).device).eval()


def model_card(model, name: str) -> str:
    """A folder's README.md: what the model is, what it records, and the command that samples `name`."""
    from utils.arch_flags import describe_model   # utils imports models: imported when a card is written
    from utils.sample.config import official_defaults
    spec = spec_of_model(model)
    px = model.patch_nums[-1] * model.vae_proxy[0].downsample
    params = sum(p.numel() for p in model.parameters())
    sampling = model.recorded.get('sampling')
    defaults = (', '.join(f'{k} {v:g}' for k, v in sampling.items()) if sampling else
                f'none: the official ImageNet settings apply ({official_defaults()})')
    tokenizer = (f'`{VAE_FILE}`' if model.tokenizer_loaded else
                 'not in the folder: the official `vae_ch160v4096z32.pth`, or pass `--vae_ckpt`')
    return '\n'.join([
        '---', 'library_name: pytorch', 'tags:', '- image-generation', f'- {spec.kind.lower()}', '---',
        f'# {spec.kind}: {os.path.basename(os.path.normpath(name))}', '',
        f'A class-conditional {spec.kind} image generator (next-scale prediction'
        + (', one weight-shared implicit block solved by fixed-point iteration' if spec.use_implicit else '') + ').',
        '', f'- model: {describe_model(model)}',
        f'- parameters: {params:,} (transformer)',
        f'- images: {px}x{px} px, scales {", ".join(map(str, spec.patch_nums))}',
        f'- tokenizer: V {spec.V}, {tokenizer}', f'- recorded sampling defaults: {defaults}', '',
        '## Sample', '', '```bash', f'.venv/bin/python gen_img.py --var_ckpt {name} --class_label 0 --seeds 0 1 2 3',
        '```', '',
        f'Files: `{CONFIG_NAME}` (the official VARHF keywords), `{WEIGHTS_FILE}` (the official state-dict keys)'
        + (f', `{VAE_FILE}`' if model.tokenizer_loaded else '') + (f', `{RECORDED_FILE}`' if model.recorded else '')
        + '. In Python: `models.VARHF.from_pretrained(...)`.', ''])


def _read_files(folder: str, source: str) -> Dict[str, Any]:
    """A folder's 'model', 'vae' (if there) through utils.checkpoint.read_checkpoint, and its 'recorded' JSON."""
    if not os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        raise HubLoadError(f'{source}: no {WEIGHTS_FILE} in this folder')
    out = dict(model=read_checkpoint(os.path.join(folder, WEIGHTS_FILE)))
    for key, name, read in (('vae', VAE_FILE, read_checkpoint), ('recorded', RECORDED_FILE, _read_json)):
        if os.path.isfile(os.path.join(folder, name)):
            out[key] = read(os.path.join(folder, name))
    return out


def read_folder(source: str) -> Dict[str, Any]:
    """A local folder or a Hub repo id (downloaded into the Hub cache) as the slim export it amounts to: 'model',
    'config' (a ModelSpec dict), 'vae' when the folder holds the tokenizer, 'sampling' / 'class_names' when it
    records them. A repo that cannot be fetched, or a folder without config.json, is a one-line HubLoadError."""
    folder = source if os.path.isdir(source) else download_repo(source)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise HubLoadError(f'{source} holds no {CONFIG_NAME}, so it is not a Hub model folder (config.json + '
                           f'{WEIGHTS_FILE}); pass a checkpoint file, or an official name such as var_d16.pth or '
                           f'viar.pth (downloaded from its Hub repo)')
    config = hub_spec(_read_json(config_path), source).to_dict()
    out = _read_files(folder, source)
    recorded = out.pop('recorded', {})
    out.update(config=config, **{k: recorded[k] for k in ('sampling', 'class_names') if k in recorded})
    return out


def download_repo(repo_id: str, **download) -> str:
    """The local snapshot of a Hub repo's model files (from the cache when offline); `download`: revision, token..."""
    try:
        return snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_FILE, VAE_FILE, RECORDED_FILE],
                                 **download)
    except Exception as e:   # offline, no network, no such repo, a bad token: each a different huggingface_hub error
        raise HubLoadError(f'{repo_id}: not a local path, and the Hugging Face Hub repo {repo_id} cannot be fetched '
                           f'({type(e).__name__}: offline, unreachable or no such repo). Download it where the Hub is '
                           f'reachable (hf download {repo_id} --local-dir DIR) and pass DIR') from None


def hub_spec(config: Dict[str, Any], where: str) -> ModelSpec:
    """The ModelSpec a VARHF / VIARHF config.json describes (missing keys take the constructor's defaults)."""
    model_cls, _ = _hub_class(where, config)
    kw = {k: p.default for k, p in model_cls._hub_mixin_init_parameters.items()
          if p.default is not inspect.Parameter.empty}
    fixed = {k: kw[k] for k in ('mlp_ratio', 'norm_eps')}
    kw.update(config)
    odd = {k: kw[k] for k in fixed if kw[k] != fixed[k]}
    if odd:
        raise HubLoadError(f'{where}/config.json: {odd} differ from the models this project builds ({fixed}); '
                           f'load it with models.VARHF.from_pretrained')
    vae = {**_VAE_OFFICIAL_FIXED, **kw['vae_kwargs']}
    implicit = dict(use_implicit=True, pre_depth=kw['pre_depth'], post_depth=kw['post_depth']) \
        if kw.get('use_implicit') else {}
    return ModelSpec(depth=kw['depth'], embed_dim=kw['embed_dim'], num_heads=kw['num_heads'],
                     patch_nums=tuple(kw['patch_nums']), num_classes=kw['num_classes'], shared_aln=kw['shared_aln'],
                     attn_l2_norm=kw['attn_l2_norm'], V=vae['vocab_size'], Cvae=vae['z_channels'], vae_ch=vae['ch'],
                     vae_ch_mult=tuple(vae['ch_mult']), vae_num_res_blocks=vae['num_res_blocks'], **implicit)
