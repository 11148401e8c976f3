"""Speed of the evaluator: feature extraction (images/s, npz file to features) and precision/recall
(seconds at N reference x M sample features), optionally beside ADM's evaluator on the same inputs.

    .venv/bin/python bench/eval_speed.py                                   # small CPU run, stand-in graph
    .venv/bin/python bench/eval_speed.py --inception_pb classify_image_graph_def.pb --image_size 256 \\
        --n_images 5000 --n_ref 10000 --n_sample 50000 --adm /path/to/guided-diffusion/evaluations/evaluator.py

Without --inception_pb a stand-in graph with ADM's tensor names (2048-wide pool features) is used, so
extraction figures then measure the pipeline around the network, not Inception itself.
"""
import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

if __name__ == '__main__':   # `python bench/eval_speed.py`: the project root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import cli  # noqa: E402
from utils.cli import flag  # noqa: E402
from utils.eval import fid_math  # noqa: E402
from utils.eval.npz_io import open_image_source, prefetch  # noqa: E402


@dataclass
class EvalSpeedArgs:
    """What to time, at which sizes, and against which ADM evaluator."""
    inception_pb: Optional[str] = flag(None, 'real ADM graph; default: a stand-in graph')
    n_images: int = flag(2000, 'images to extract features of')
    image_size: int = flag(64, 'their side')
    batch_size: int = flag(64, 'extraction batch')
    n_ref: int = flag(4000, 'reference features for precision/recall (ADM: 10000)')
    n_sample: int = flag(4000, 'sample features (ADM: 50000)')
    dim: int = flag(2048, 'feature width')
    pr_dtype: str = flag('adm', 'distance kernel of precision/recall', choices=('adm', 'float32', 'float64'))
    adm: Optional[str] = flag(None, "path to ADM's evaluations/evaluator.py to compare against")
    repeat: int = flag(3, 'extraction timings: best of this many runs')
    skip_extraction: bool = flag(False, 'time precision/recall only')
    skip_pr: bool = flag(False, 'time extraction only')


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB. Not through utils/memory.py: that imports torch, which the
    evaluator never loads and whose memory would then count in the peak."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def load_adm(path: str, graph_path: str, workdir: str):
    """Imports ADM's evaluator.py and makes its hard-coded graph path resolve to graph_path."""
    link = os.path.join(workdir, 'classify_image_graph_def.pb')
    if not os.path.exists(link):
        os.symlink(os.path.abspath(graph_path), link)
    os.chdir(workdir)
    spec = importlib.util.spec_from_file_location('adm_evaluator', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_extraction(args: EvalSpeedArgs, graph_path: str, npz_path: str, adm) -> None:
    """Images/s from an npz file to pool + spatial features and their statistics, ours then ADM's."""
    from utils.eval.inception_tf import InceptionExtractor
    ex = InceptionExtractor(graph_path)
    src = open_image_source(npz_path)
    ex.run(next(src.batches(args.batch_size)))                  # warm-up
    best = float('inf')
    for _ in range(args.repeat):                                # best of a few: the machine may be shared
        t = time.perf_counter()
        acts = ex.extract(prefetch(src.batches(args.batch_size)), src.count)
        best = min(best, time.perf_counter() - t)
    ours = src.count / best
    print(f'extraction  ours: {ours:8.1f} img/s  ({src.count} images {src.shape[1]}x{src.shape[2]}, '
          f'batch {args.batch_size}, file to features + statistics); peak RSS {peak_rss_gb():.2f} GB')
    if adm is None:
        return
    import tensorflow.compat.v1 as tf
    ev = adm.Evaluator(tf.Session(config=tf.ConfigProto(allow_soft_placement=True)), batch_size=args.batch_size)
    ev.warmup()
    best = float('inf')
    for _ in range(args.repeat):
        t = time.perf_counter()
        acts_adm = ev.read_activations(npz_path)
        ev.read_statistics(npz_path, acts_adm)                  # mean/cov, which ours includes
        best = min(best, time.perf_counter() - t)
    theirs = src.count / best
    same = np.allclose(acts_adm[0], acts.pool_NP, rtol=1e-4, atol=1e-5)
    print(f'extraction  ADM:  {theirs:8.1f} img/s;  ours/ADM = {ours / theirs:.2f}x  (same features: {same})')


def bench_precision_recall(args: EvalSpeedArgs, adm) -> None:
    """Seconds for radii of both sets plus the precision/recall pass, on clustered non-negative 'pool features'
    with Inception-like norms (~600)."""
    from utils.eval.inception_tf import TFDistanceKernel
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 0.25, (50, args.dim))

    def feats(n, shift):
        return np.maximum(0.35 + centers[rng.integers(0, 50, n)] + rng.normal(0, 0.35, (n, args.dim)) + shift,
                          0).astype(np.float32)
    ref, sample = feats(args.n_ref, 0.0), feats(args.n_sample, 0.02)
    kernel = TFDistanceKernel() if args.pr_dtype == 'adm' else fid_math.NumpyDistanceKernel(args.pr_dtype)
    t = time.perf_counter()
    r_ref, r_sample = fid_math.knn_radii(ref, kernel=kernel), fid_math.knn_radii(sample, kernel=kernel)
    ours_pr = fid_math.manifold_precision_recall(ref, r_ref, sample, r_sample, kernel)
    ours = time.perf_counter() - t
    print(f'prec/recall ours: {ours:8.2f} s  ({args.n_ref} x {args.n_sample} x {args.dim}, {args.pr_dtype}) '
          f'-> P={ours_pr[0]:.6f} R={ours_pr[1]:.6f}; peak RSS {peak_rss_gb():.2f} GB')
    if adm is None:
        return
    import tensorflow.compat.v1 as tf
    ev = adm.Evaluator(tf.Session(config=tf.ConfigProto(allow_soft_placement=True)))
    t = time.perf_counter()
    theirs_pr = ev.compute_prec_recall(ref, sample)
    theirs = time.perf_counter() - t
    print(f'prec/recall ADM:  {theirs:8.2f} s  -> P={theirs_pr[0]:.6f} R={theirs_pr[1]:.6f};  '
          f'ADM/ours time = {theirs / ours:.2f}x; peak RSS {peak_rss_gb():.2f} GB')


def main(argv=None):
    """Both benchmarks on random images and features."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_args(p, EvalSpeedArgs, 'evaluator speed')
    args = cli.from_namespace(EvalSpeedArgs, p.parse_args(argv))
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    work = tempfile.mkdtemp(prefix='eval_speed_')
    graph_path = args.inception_pb
    if graph_path is None:
        from utils.eval.inception_tf import write_standin_graph
        graph_path = write_standin_graph(os.path.join(work, 'standin.pb'), pool_width=2048, spatial_channels=64,
                                         num_classes=1008, resize=8)
    graph_path = os.path.abspath(graph_path)
    adm = load_adm(os.path.abspath(args.adm), graph_path, work) if args.adm else None
    if not args.skip_extraction:
        npz_path = os.path.join(work, 'images.npz')
        np.savez(npz_path, arr_0=np.random.default_rng(0).integers(
            0, 256, (args.n_images, args.image_size, args.image_size, 3), dtype=np.uint8))
        bench_extraction(args, graph_path, npz_path, adm)
    if not args.skip_pr:
        bench_precision_recall(args, adm)


if __name__ == '__main__':
    main()
