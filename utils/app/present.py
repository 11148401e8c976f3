"""What the page shows of a RunResult: gallery items, the iterations chart's table, a summary (pure, no Gradio)."""
from typing import List, Sequence, Tuple

import numpy as np
import pandas as pd

from utils.sample.image_io import to_uint8_HWC

CHART_COLUMNS = ('scale', 'iterations', 'run')


def gallery(result, class_names: Sequence[str]) -> List[Tuple[np.ndarray, str]]:
    """(uint8 (R, R, 3) image, caption) per image, at the model's resolution."""
    return [(to_uint8_HWC(img_3HW), f'{class_names[c]} · seed {s}')
            for img_3HW, (c, s) in zip(result.images_N3HW, result.pairs)]


def scale_labels(patch_nums: Sequence[int]) -> List[str]:
    """'1: 1x1', '2: 2x2', ... one per scale (zero-padded index so they sort in scale order)."""
    width = len(str(len(patch_nums)))
    return [f'{k + 1:0{width}d}: {pn}x{pn}' for k, pn in enumerate(patch_nums)]


def chart_table(runs: Sequence[Tuple[str, object]], patch_nums: Sequence[int]) -> pd.DataFrame:
    """One row per (run, scale) with the implicit iterations it ran (none for a VAR); with several runs the label
    carries the run's tag ('1: 1x1 A') so the chart puts their bars side by side instead of stacking them."""
    rows = []
    for name, r in runs:
        tag = f' {name.split(":")[0]}' if len(runs) > 1 else ''
        rows += [(label_k + tag, float(it), name) for label_k, it in zip(scale_labels(patch_nums), r.iters)]
    return pd.DataFrame(rows, columns=list(CHART_COLUMNS))


def figures(result) -> Tuple[float, float]:
    """(KV-cache MiB, seconds per image) of a run: the summary's figures as numbers, for API callers."""
    return float(result.kv_cache_mib), float(result.seconds_per_image)


def summary(result, title: str = '') -> str:
    """Markdown lines: the model, iterations per scale, the schedule, KV-cache MiB, seconds per image, notes."""
    lines = [f'**{title or result.model}**']
    if result.iters:
        lines.append(f"iterations per scale: {', '.join(f'{i:g}' for i in result.iters)} (total {sum(result.iters):g})")
    lines += [f'schedule: {result.schedule}',
              f'KV cache: {result.kv_cache_mib:.2f} MiB · {result.seconds_per_image:.3f} s per image '
              f'({len(result.pairs)} images)']
    lines += [f'note: {n}' for n in result.notes]
    return '  \n'.join(lines)

