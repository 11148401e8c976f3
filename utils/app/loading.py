"""The web app's models: which files to serve, loading them, their class names.

Rule: `--var_ckpt` when given, plus `--compare_ckpt`; else the demo's two checkpoints in `--demo_dir` (VIAR first);
else nothing, and the page says how to get weights.
"""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from utils.arch_flags import describe_model
from utils.checkpoint import CheckpointError
from utils.model_io import Loaded, load_or_build
from utils.sample.compile_util import SamplingError, prepare_for_sampling
from utils.sample.config import RECORDED, ModelSource, SampleConfig, resolve_device

IMAGENET_NAMES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              'assets', 'imagenet_classes.txt')
DEMO_FILES = (('VIAR', os.path.join('viar', 'viar-slim.pth')), ('VAR', os.path.join('var', 'var-slim.pth')))
HOW_TO_GET_WEIGHTS = ('No model to serve. Either train the CPU demo (`bash scripts/demo.sh`, a few minutes; then '
                      '`python app.py` serves demo_output/), or pass a checkpoint: `python app.py --var_ckpt viar.pth '
                      '--use_implicit True` downloads the official VIAR-d30 and its tokenizer into ckpts/ (a GPU is '
                      'advised), `--var_ckpt PATH` serves a train.py export.')


@dataclass
class AppModel:
    """One served model: its loaded pair, the sampler that runs it, the names of its classes."""
    name: str
    loaded: Loaded
    sampler: object
    class_names: List[str]

    @property
    def var(self):
        return self.loaded.var

    @property
    def vae(self):
        return self.loaded.vae

    @property
    def num_scales(self) -> int:
        return len(self.var.patch_nums)

    @property
    def resolution(self) -> int:
        """Side in pixels of the images this model makes (and of the images it edits)."""
        return self.var.patch_nums[-1] * self.vae.downsample

    def describe(self) -> str:
        return f'{self.name}: {describe_model(self.var)}, {self.resolution} px'


def class_names(num_classes: int, names_file: str = IMAGENET_NAMES) -> List[str]:
    """ImageNet's names for 1000 classes (the names file), 'digit d' for the demo's 10, else 'class i'."""
    if num_classes == 1000 and os.path.isfile(names_file):
        with open(names_file) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) == 1000:
            return names
    if num_classes == 10:
        return [f'digit {d}' for d in range(10)]
    return [f'class {i}' for i in range(num_classes)]


SERVER_FLAGS = ('dtype', 'compile', 'fast')   # sampling settings of the server (app.py flags), not of a request


def serve_model(name: str, loaded: Loaded, sample: SampleConfig) -> AppModel:
    """An AppModel around a loaded pair, with the sampler of the server's --dtype / --compile / --fast."""
    sampler = prepare_for_sampling(loaded.var, compile=sample.compile, dtype=sample.dtype, fast=sample.fast)
    return AppModel(name, loaded, sampler, class_names(loaded.var.num_classes))


def demo_files(demo_dir: str) -> List[Tuple[str, str]]:
    """(name, path) of the demo checkpoints present in demo_dir (VIAR first)."""
    return [(name, os.path.join(demo_dir, rel)) for name, rel in DEMO_FILES
            if os.path.isfile(os.path.join(demo_dir, rel))]


def demo_sample_defaults(demo_dir: str) -> dict:
    """The sampling values the demo used (results.json 'sample'): the page's defaults when serving the demo."""
    try:
        with open(os.path.join(demo_dir, 'results.json')) as f:
            sample = json.load(f).get('sample') or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: sample[k] for k in RECORDED if isinstance(sample.get(k), (int, float))}


def app_sources(source: ModelSource, demo_dir: str, compare_ckpt: str = '') -> List[Tuple[str, ModelSource]]:
    """(name, ModelSource) of every model to serve, by the rule of the module docstring."""
    out = []
    if source.var_ckpt:
        out.append(('model', source))
    elif not compare_ckpt:
        for name, path in demo_files(demo_dir):
            out.append((name, dataclasses.replace(source, var_ckpt=path, typed=())))
    if compare_ckpt:
        if not out:
            raise SystemExit('error: --compare_ckpt needs --var_ckpt (the first model) as well.')
        out.append(('compare', dataclasses.replace(source, var_ckpt=compare_ckpt, typed=())))
    return out


def load_app_models(sources: Sequence[Tuple[str, ModelSource]], sample: SampleConfig,
                    log: Callable[[str], None] = print) -> Tuple[List[AppModel], List[str]]:
    """(served models, error lines): a model that fails to load is left out and its line shown on the page."""
    models, errors = [], []
    for name, src in sources:
        try:
            device = resolve_device(src.device)
            loaded = load_or_build(src, device, log=log)
            model = serve_model(name, loaded, sample)
        except (CheckpointError, SamplingError, SystemExit, OSError) as e:
            errors.append(f'{src.var_ckpt}: cannot load: {str(e).removeprefix("error: ")}')
            continue
        if name in ('model', 'compare'):
            model.name = f'{loaded.var.kind} ({loaded.tag})'
        models.append(model)
    return models, errors


def fatal_load_error(named: bool, models: Sequence[AppModel], errors: Sequence[str]) -> Optional[str]:
    """The line app.py exits with instead of serving, or None (named: --var_ckpt given). A named checkpoint that does
    not load ends the server, and so do sources none of which loaded: a page without a model has no endpoints."""
    if not errors or (models and not named):
        return None
    fix = '' if named else ' Run `bash scripts/demo.sh` again to remake the demo models, or pass --var_ckpt PATH.'
    return 'error: ' + '; '.join(errors) + fix


def page_sample_defaults(models: Sequence[AppModel], demo: Optional[dict] = None) -> SampleConfig:
    """Start values: the first recorded sampling defaults, else the demo's, else SampleConfig's; top-k <= vocab."""
    recorded = next((m.loaded.sample_defaults for m in models if m.loaded.sample_defaults), None)
    defaults = SampleConfig(**(recorded or demo or {}))
    vocab = min((m.var.V for m in models), default=None)
    if vocab is not None and defaults.top_k > vocab:
        defaults = dataclasses.replace(defaults, top_k=0)
    return defaults
