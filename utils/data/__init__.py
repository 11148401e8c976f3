"""Data: class-folder datasets and augmentation (datasets.py), loaders, samplers, the token cache.

VAR's `utils.data.pil_loader` and `utils.data.normalize_01_into_pm1` are this package's `datasets.load_rgb` and
`datasets.pm1`, looked up on first use so that importing a light submodule does not import torchvision.
"""

_VAR_NAMES = {'pil_loader': 'load_rgb', 'normalize_01_into_pm1': 'pm1'}


def __getattr__(name: str):
    if name in _VAR_NAMES:
        from utils.data import datasets
        return getattr(datasets, _VAR_NAMES[name])
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
