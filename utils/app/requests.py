"""The web app's requests without the web: values checked as the command line checks them, then run on a served
model; a bad value raises `RequestError` with the one line the page shows. Shapes: N images, R pixels per side.
"""
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from utils.sample import generate as gen
from utils.sample.compile_util import SamplingError
from utils.sample.config import SampleConfig
from utils.sample.editing import load_edit_inputs, prepare_edit
from utils.sample.schedule_flags import schedule_note

CONDEC, PER_SCALE, ADAPTIVE = 'Con./Dec. (iter_left, iter_right)', 'per-scale list (iters)', 'adaptive (tau, tau_cap)'
SCHEDULE_MODES = (CONDEC, PER_SCALE, ADAPTIVE)
MAX_IMAGES = 64   # images per request: the page answers in seconds, the queue stays short
Progress = Callable[[float, str], None]


class RequestError(ValueError):
    """A request value the app cannot run; the message says what to change."""


@dataclass
class ScheduleRequest:
    """The schedule controls of one request: the mode picks which fields count."""
    mode: str = CONDEC
    iter_left: int = 10
    iter_right: int = 10
    iters: str = ''
    tau: str = ''
    tau_cap: int = 0


@dataclass
class RunResult:
    """What a request ran: images (N, 3, R, R) in [0, 1], their (class, seed), and the figures shown."""
    images_N3HW: torch.Tensor
    pairs: list                            # (class, seed) of each image
    schedule: str                          # IterSchedule.describe(), or the model's note for a VAR
    iters: List[float]                     # implicit iterations per scale (mean over batches); [] for a VAR
    kv_cache_mib: float                    # largest KV cache of a batch (cond + uncond rows; cond only at cfg 0)
    seconds_per_image: float
    model: str
    notes: List[str] = field(default_factory=list)
    extra_images: dict = field(default_factory=dict)   # editing: input, mask, reconstruction (3, R, R)


def as_int(value, name: str, lo: Optional[int] = None) -> int:
    """A whole number from a form field (Gradio numbers may arrive as floats), else RequestError."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise RequestError(f'{name} must be a whole number, got {value!r}') from None
    if f != int(f):
        raise RequestError(f'{name} must be a whole number, got {value!r}')
    if lo is not None and f < lo:
        raise RequestError(f'{name} must be >= {lo}, got {int(f)}')
    return int(f)


def as_float(value, name: str) -> float:
    """A number from a form field, else RequestError."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f'{name} must be a number, got {value!r}') from None


def parse_seeds(text, limit: int = MAX_IMAGES) -> List[int]:
    """'0,1,2,3', a range '0-7', or both ('0-3,10'); distinct seeds >= 0, at most `limit`."""
    seeds: List[int] = []
    for part in str(text or '').replace(' ', '').split(','):
        if not part:
            continue
        try:
            lo, _, hi = part.partition('-')
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise RequestError(f"seeds must be whole numbers >= 0 like '0,1,2,3' or a range '0-7', "
                               f'got {text!r}') from None
        if hi_i < lo_i:
            raise RequestError(f'seed range {part!r} runs backwards; write it low-high')
        if hi_i - lo_i >= limit or len(seeds) + hi_i - lo_i + 1 > limit:
            raise RequestError(f'at most {limit} images per request, got more seeds in {text!r}')
        seeds += range(lo_i, hi_i + 1)
    if not seeds:
        raise RequestError("give at least one seed, e.g. '0,1,2,3' or '0-7'")
    if len(set(seeds)) != len(seeds):
        raise RequestError(f'seeds repeat in {text!r}; the same (class, seed) gives the same image')
    return seeds


def sample_config(cfg, top_k, top_p, schedule: ScheduleRequest, num_scales: int,
                  base: Optional[SampleConfig] = None) -> SampleConfig:
    """The request's SampleConfig, validated as the CLI's; only the mode's schedule fields are set (and typed), the
    rest keep the server's values."""
    values = dict(cfg=as_float(cfg, 'cfg'), top_k=as_int(top_k, 'top_k'), top_p=as_float(top_p, 'top_p'))
    if schedule.mode == CONDEC:
        values.update(iter_left=as_int(schedule.iter_left, 'iter_left'),
                      iter_right=as_int(schedule.iter_right, 'iter_right'))
    elif schedule.mode == PER_SCALE:
        if not str(schedule.iters or '').strip():
            raise RequestError(f'iters: give {num_scales} counts, one per scale, e.g. '
                               + ','.join(['4'] * num_scales))
        values.update(iters=str(schedule.iters).strip())
    elif schedule.mode == ADAPTIVE:
        if not str(schedule.tau or '').strip():
            raise RequestError('tau: give a residual to stop at (> 0), e.g. 0.01, or one per scale')
        values.update(tau=str(schedule.tau).strip(), tau_cap=as_int(schedule.tau_cap, 'tau_cap', lo=0))
    else:
        raise RequestError(f'schedule mode must be one of {list(SCHEDULE_MODES)}, got {schedule.mode!r}')
    config = dataclasses.replace(base or SampleConfig(), **values, typed=tuple(values))
    try:
        config.validate()
        config.schedule(num_scales)   # list length, tau > 0, a cap >= 1
    except SamplingError as e:
        raise RequestError(str(e)) from None
    return config


def check_class(model, cls, name: str = 'class') -> int:
    """A class id within the model's classes (gen_img.py's check)."""
    cls = as_int(cls, name)
    try:
        gen.check_classes([cls], model.var.num_classes, flag=name)
    except SystemExit as e:
        raise RequestError(str(e).removeprefix('error: ')) from None
    return cls


def _notes(model, config: SampleConfig) -> List[str]:
    """The request's notes: check_model's warnings about this model (its errors are a RequestError)."""
    notes: List[str] = []
    try:
        config.check_model(model.var, log=notes.append)
    except SamplingError as e:
        raise RequestError(str(e)) from None
    return [n.removeprefix('warning: ') for n in notes]


def run(model, pairs: Sequence, config: SampleConfig, batch_size: int, edit=None,
        progress: Optional[Progress] = None) -> RunResult:
    """Sample the (class, seed) pairs' images in batches; progress(fraction, text) after each batch."""
    batch_size = as_int(batch_size, 'batch size', lo=1)
    notes = _notes(model, config)
    kw = config.call_kwargs(model.num_scales)

    def report(done: int):
        if progress:
            progress(done / len(pairs), f'{model.name}: {done}/{len(pairs)} images')
    t0 = time.perf_counter()
    with torch.inference_mode():
        imgs, stats = gen.generate(model.sampler, list(pairs), batch_size, kw, edit, progress=False, on_batch=report)
    dt = time.perf_counter() - t0
    iters = gen.mean_iters(stats)
    schedule = kw['schedule']
    text = schedule.describe() if model.var.kind == 'VIAR' else schedule_note(model.var.kind, schedule)
    return RunResult(imgs, list(pairs), text, iters, max(s.kv_cache_bytes for s in stats) / 2 ** 20,
                     dt / len(pairs), model.name, notes)


def generate(model, cls, seeds, config: SampleConfig, batch_size=8, progress: Optional[Progress] = None
             ) -> RunResult:
    """Images of one class at the given seeds."""
    cls = check_class(model, cls)
    return run(model, gen.image_list([cls], parse_seeds(seeds)), config, batch_size, progress=progress)


def edit(model, image_path: str, mask_paths: Sequence[str], box: str, mode: str, cls, seeds,
         config: SampleConfig, batch_size=8, progress: Optional[Progress] = None) -> RunResult:
    """Zero-shot editing: keep the image's tokens outside the mask, sample inside under class `cls`."""
    cls = check_class(model, cls, 'edit class')
    seeds = parse_seeds(seeds)
    if config.more_smooth:
        raise RequestError('more_smooth does not apply to editing')
    if not image_path:
        raise RequestError('upload an image to edit')
    try:
        img_13RR, mask_1RR = load_edit_inputs(image_path, mask_paths, box, mode, model.resolution)
    except ValueError as e:   # ImageInputError, a bad box or mode, no mask
        raise RequestError(str(e)) from None
    if not mask_1RR.any():
        raise RequestError('the edit mask is empty (nothing to regenerate): draw on the image or give a box')
    dev = model.sampler.device
    spec, views = prepare_edit(model.vae, img_13RR.to(dev), mask_1RR.to(dev), model.var.patch_nums)
    result = run(model, gen.image_list([cls], seeds), config, batch_size, edit=spec, progress=progress)
    result.extra_images = views
    return result
