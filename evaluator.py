"""ADM-compatible evaluation of a sample batch against a reference batch.

    python evaluator.py REF.npz SAMPLE.npz [--inception_pb classify_image_graph_def.pb] [--json OUT]

Prints the five metric lines of openai/guided-diffusion's evaluator for the same inputs and graph; inputs stream
(SAMPLE may be a PNG folder), reference features are cached in REF.stats.npz, and the IS splits follow a seeded
shuffle (--adm_is: ADM's order). Differences from ADM: docs/EVALUATION.md.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, astuple, dataclass, replace
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from utils.atomic import atomic_path, write_json_atomic
from utils.eval import fid_math
from utils.eval.inception_tf import InceptionExtractor, SetFeatures, TFDistanceKernel, resolve_graph_path
from utils.eval.npz_io import EvalInputError, ImageSource, open_image_source, prefetch, read_precomputed_stats
from utils.logging_util import get_logger

CACHE_VERSION = 1
PR_MODES = ('adm', 'float32', 'float64')


@dataclass
class EvalConfig:
    """Evaluator settings (the CLI flags)."""
    ref_batch: str
    sample_batch: str
    inception_pb: Optional[str] = None   # else ./classify_image_graph_def.pb, else downloaded
    batch_size: int = 64                 # images per Inception batch
    is_seed: int = 0                     # seed of the shuffle before the IS splits
    adm_is: bool = False                 # IS exactly as ADM: no shuffle
    pr_dtype: str = 'adm'                # distances: 'adm' = ADM's TF float16 block; or exact numpy
    json: Optional[str] = None           # also write the metrics here
    cache: bool = True                   # read/write REF.stats.npz
    progress: bool = True                # progress bars on stderr


@dataclass
class Metrics:
    """The five numbers ADM prints."""
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float


log = get_logger('evaluator', to_stderr=True)   # status lines on stderr: stdout holds only the metric lines


# ----------------------------------------------------------------------------- caching

def stats_cache_path(ref_path: str) -> str:
    """REF.npz -> REF.stats.npz (a folder 'refs/' -> 'refs.stats.npz')."""
    root = ref_path.rstrip('/\\')
    return (os.path.splitext(root)[0] if os.path.isfile(root) else root) + '.stats.npz'


def content_fingerprint(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's sorted PNG names and bytes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for name in sorted(f for f in os.listdir(path) if f.lower().endswith('.png')):
            h.update(name.encode() + b'\0')
            with open(os.path.join(path, name), 'rb') as f:
                h.update(hashlib.file_digest(f, 'sha256').digest())
        return h.hexdigest()
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def _load_cache(path: str, key: dict) -> Optional[dict]:
    """Cached reference arrays when the cache exists and its key matches, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as e:  # a broken cache is only a reason to recompute
        log.info(f'ignoring unreadable cache {path} ({e})')
        return None
    if str(data.get('key', '')) != json.dumps(key, sort_keys=True):
        log.info(f'cache {path} is stale (reference or graph changed); recomputing')
        return None
    return data


def _save_cache(path: str, key: dict, arrays: dict) -> None:
    """Writes the cache atomically; an unwritable location only costs a warning."""
    try:
        with atomic_path(path) as tmp, open(tmp, 'wb') as f:   # a file object: np.savez adds no suffix
            np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
        log.info(f'cached reference features in {path}')
    except OSError as e:
        log.info(f'could not write cache {path} ({e}); the reference will be recomputed next time')


# ----------------------------------------------------------------------------- features

def _bar(total: int, desc: str, enabled: bool, unit: str):
    """A tqdm progress bar on stderr."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, file=sys.stderr)


def extract(src: ImageSource, extractor, cfg: EvalConfig, desc: str):
    """Inception activations of an image set, streamed in batches."""
    with _bar(src.count, desc, cfg.progress, 'img') as bar:
        return extractor.extract(prefetch(src.batches(cfg.batch_size)), src.count, bar.update)


def radii(pool_NP: np.ndarray, kernel, cfg: EvalConfig, desc: str) -> np.ndarray:
    """k-NN radii of a feature set with a progress bar over distance pairs."""
    with _bar(len(pool_NP) ** 2, desc, cfg.progress, 'pair') as bar:
        return fid_math.knn_radii(pool_NP, fid_math.NHOOD_K, kernel, bar.update)


def _with_precomputed(feats: SetFeatures, path: str) -> SetFeatures:
    """Uses mu/sigma/mu_s/sigma_s stored in the .npz when present, as ADM does."""
    stats = read_precomputed_stats(path)
    if stats is None:
        return feats
    log.info(f'using the FID statistics stored in {path}')
    if np.shape(stats['mu']) != feats.mu.shape or np.shape(stats['mu_s']) != feats.mu_s.shape:
        raise EvalInputError(f'{path}: stored statistics have widths {np.shape(stats["mu"])}/{np.shape(stats["mu_s"])} '
                             f'but the Inception graph gives {feats.mu.shape}/{feats.mu_s.shape}; '
                             f'use the graph the statistics were made with')
    return replace(feats, **stats)


def reference_features(src: ImageSource, extractor, kernel, cfg: EvalConfig, graph_path: str) -> SetFeatures:
    """Reference features from REF.stats.npz when it matches REF and the graph, else computed and cached there."""
    cache_path = stats_cache_path(src.path)
    key = {'version': CACHE_VERSION, 'ref_sha256': content_fingerprint(src.path),
           'graph_sha256': content_fingerprint(graph_path)} if cfg.cache else {}
    data = (_load_cache(cache_path, key) if cfg.cache else None) or {}
    dirty = False
    if 'pool' not in data:
        log.info(f'computing reference activations for {src.path} ...')
        acts = extract(src, extractor, cfg, 'reference')
        data = {'pool': acts.pool_NP, 'mu': acts.mu, 'sigma': acts.sigma, 'mu_s': acts.mu_s, 'sigma_s': acts.sigma_s}
        dirty = True
    else:
        log.info(f'using cached reference activations from {cache_path}')
    radii_key = f'radii_{kernel.name}_k{fid_math.NHOOD_K}'   # float16 rounding may differ per device
    if radii_key not in data:
        data[radii_key] = radii(data['pool'], kernel, cfg, 'reference radii')
        dirty = True
    if dirty and cfg.cache:
        _save_cache(cache_path, key, {k: v for k, v in data.items() if k != 'key'})
    feats = SetFeatures(data['pool'], data['mu'], data['sigma'], data['mu_s'], data['sigma_s'], data[radii_key])
    return _with_precomputed(feats, src.path)


def sample_features(src: ImageSource, extractor, kernel, cfg: EvalConfig) -> SetFeatures:
    """Sample features; never cached (samples change from run to run)."""
    log.info(f'computing sample activations for {src.path} ...')
    feats = extract(src, extractor, cfg, 'samples')
    feats.radii_N = radii(feats.pool_NP, kernel, cfg, 'sample radii')
    return _with_precomputed(feats, src.path)


# ----------------------------------------------------------------------------- metrics

def inception_score_of(pool_NP: np.ndarray, logits_weight_PK: np.ndarray, seed: Optional[int]) -> float:
    """IS from pool features: optional seeded shuffle, logits = pool @ W, softmax, 5,000-row splits."""
    order = fid_math.split_order(len(pool_NP), seed)
    logits_NK = pool_NP[order] @ logits_weight_PK
    return fid_math.inception_score(np.exp(fid_math.log_softmax(logits_NK)), fid_math.IS_SPLIT_SIZE)


def compute_metrics(ref: SetFeatures, sample: SetFeatures, logits_weight_PK, kernel, cfg: EvalConfig) -> Metrics:
    """The five ADM metrics from prepared features."""
    is_value = inception_score_of(sample.pool_NP, logits_weight_PK, None if cfg.adm_is else cfg.is_seed)
    fid = fid_math.frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma)
    sfid = fid_math.frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s)
    with _bar(len(ref.pool_NP) * len(sample.pool_NP), 'precision/recall', cfg.progress, 'pair') as bar:
        precision, recall = fid_math.manifold_precision_recall(
            ref.pool_NP, ref.radii_N, sample.pool_NP, sample.radii_N, kernel, bar.update)
    return Metrics(is_value, fid, sfid, precision, recall)


def make_kernel(pr_dtype: str):
    """Distance kernel for precision/recall: ADM's TF float16 block, or exact numpy arithmetic."""
    if pr_dtype == 'adm':
        return TFDistanceKernel()
    if pr_dtype in ('float32', 'float64'):
        return fid_math.NumpyDistanceKernel(pr_dtype)
    raise EvalInputError(f'--pr_dtype {pr_dtype}: choose one of {", ".join(PR_MODES)}')


def check_count(src: ImageSource) -> None:
    """Rejects image sets too small for the metrics."""
    need = fid_math.NHOOD_K + 1
    if src.count < need:
        raise EvalInputError(f'{src.path}: {src.count} images, but at least {need} are needed (precision/recall '
                             f'uses the {fid_math.NHOOD_K} nearest neighbours of each image, FID a covariance); '
                             f'published numbers use 50,000 samples against the 10,000-image reference')


def evaluate(cfg: EvalConfig, extractor=None, graph_path: Optional[str] = None) -> Metrics:
    """Runs the whole evaluation; extractor/graph_path may be passed in to reuse a loaded graph."""
    if cfg.batch_size < 1:
        raise EvalInputError(f'--batch_size {cfg.batch_size}: must be at least 1')
    ref_src, sample_src = open_image_source(cfg.ref_batch), open_image_source(cfg.sample_batch)
    check_count(ref_src)
    check_count(sample_src)
    if graph_path is None:
        graph_path = resolve_graph_path(cfg.inception_pb)
    if extractor is None:
        extractor = InceptionExtractor(graph_path)
    kernel = make_kernel(cfg.pr_dtype)
    ref = reference_features(ref_src, extractor, kernel, cfg, graph_path)
    sample = sample_features(sample_src, extractor, kernel, cfg)
    if ref.pool_NP.shape[1] != sample.pool_NP.shape[1]:
        raise EvalInputError('reference and sample features differ in width; was the cache made with another graph?')
    return compute_metrics(ref, sample, extractor.logits_weight_PK, kernel, cfg)


def report(metrics: Metrics, cfg: EvalConfig) -> None:
    """Prints the metric lines as ADM does and writes the JSON file if asked."""
    for label, value in zip(('Inception Score:', 'FID:', 'sFID:', 'Precision:', 'Recall:'), astuple(metrics)):
        print(label, value)
    if cfg.json:
        out = {**asdict(metrics), 'is_mode': 'adm' if cfg.adm_is else 'shuffled',
               'is_seed': None if cfg.adm_is else cfg.is_seed, 'pr_dtype': cfg.pr_dtype,
               'ref_batch': cfg.ref_batch, 'sample_batch': cfg.sample_batch}
        write_json_atomic(out, cfg.json)
        log.info(f'wrote {cfg.json}')


def parse_args(argv=None) -> EvalConfig:
    """CLI -> EvalConfig."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ref_batch', help='reference batch: .npz with arr_0 (uint8 NHWC), maybe mu/sigma/mu_s/sigma_s')
    p.add_argument('sample_batch', help='sample batch: .npz with arr_0 (uint8 NHWC) or a folder of PNGs')
    p.add_argument('--inception_pb', default=None, help="ADM's classify_image_graph_def.pb")
    p.add_argument('--batch_size', type=int, default=EvalConfig.batch_size)
    p.add_argument('--is_seed', type=int, default=EvalConfig.is_seed, help='seed of the shuffle before IS splits')
    p.add_argument('--adm_is', action='store_true', help='Inception Score exactly as ADM (no shuffle)')
    p.add_argument('--pr_dtype', default='adm', choices=PR_MODES,
                   help="precision/recall distances: 'adm' = ADM's float16 TF block (default, same numbers); "
                        "float32/float64 = exact arithmetic (differs from ADM by float16 ties)")
    p.add_argument('--json', default=None, help='write the metrics to this JSON file')
    p.add_argument('--no_cache', dest='cache', action='store_false', help='do not read or write REF.stats.npz')
    p.add_argument('--no_progress', dest='progress', action='store_false', help='no progress bars')
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> Metrics:
    """CLI entry: evaluate and print; user mistakes end with a one-line message."""
    cfg = parse_args(argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # before TensorFlow is first imported (inception_tf._tf)
    try:
        metrics = evaluate(cfg)
    except EvalInputError as e:
        raise SystemExit(f'error: {e}') from None
    report(metrics, cfg)
    return metrics


if __name__ == '__main__':
    main()
