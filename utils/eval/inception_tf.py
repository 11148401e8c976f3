"""TensorFlow side of the ADM evaluator: load the frozen Inception graph, extract features, and ADM's float16
pairwise-distance block. Tensor names are those of ADM's `classify_image_graph_def.pb` (images float32 NHWC in
0..255; the MatMul's weight gives class logits, no bias, as ADM). TensorFlow is optional and slow to import: it is
imported when a class is built.
"""
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from utils.atomic import atomic_path
from utils.eval.fid_math import ADM_BLOCK, SFID_CHANNELS, MomentAccumulator, gaussian_stats
from utils.eval.npz_io import EvalInputError

ADM_GRAPH_URL = ('https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/'
                 'classify_image_graph_def.pb')
GRAPH_FILENAME = 'classify_image_graph_def.pb'
INPUT_NAME = 'ExpandDims:0'
POOL_NAME = 'pool_3:0'
SPATIAL_NAME = 'mixed_6/conv:0'
LOGITS_MATMUL_NAME = 'softmax/logits/MatMul'


def _tf():
    """The TF1-style API, imported on first use (importing TensorFlow takes seconds)."""
    try:
        import tensorflow.compat.v1 as tf
    except ImportError:
        raise SystemExit('the evaluator needs TensorFlow, which this .venv lacks (set up with SETUP_WITHOUT_EVAL=1?): '
                         'run `bash scripts/setup.sh` without it, or `.venv/bin/python -m pip install '
                         '"$(grep ^tensorflow requirements.txt)"`') from None
    return tf


def _session(graph):
    """A session like ADM's: soft placement, GPU memory grown on demand."""
    tf = _tf()
    config = tf.ConfigProto(allow_soft_placement=True)
    config.gpu_options.allow_growth = True
    return tf.Session(graph=graph, config=config)


# ----------------------------------------------------------------------------- finding the graph

def resolve_graph_path(explicit: Optional[str] = None, search_dir: str = '.',
                       url: Optional[str] = ADM_GRAPH_URL, timeout: float = 30.0) -> str:
    """The Inception graph: explicit path, else search_dir/GRAPH_FILENAME, else downloaded there (url None: never)."""
    if explicit:
        if not os.path.isfile(explicit):
            raise EvalInputError(f'--inception_pb {explicit}: no such file; download the graph from {ADM_GRAPH_URL}')
        return explicit
    local = os.path.join(search_dir, GRAPH_FILENAME)
    if os.path.isfile(local):
        return local
    why = 'downloading is disabled'
    if url:
        try:
            _download(url, local, timeout)
            return local
        except (urllib.error.URLError, OSError) as e:
            why = f'download from {url} failed: {e}'
    raise EvalInputError(f'Inception graph {GRAPH_FILENAME} not found (no --inception_pb, not in '
                         f'{os.path.abspath(search_dir)}) and {why}. Download it from {ADM_GRAPH_URL} and '
                         f'pass --inception_pb PATH or put it in the working directory.')


def _download(url: str, dest: str, timeout: float) -> None:
    """Downloads url to dest atomically: a failed download leaves nothing behind."""
    print(f'downloading the Inception graph from {url} ...')
    with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, 'wb') as f:
        total = int(r.headers.get('Content-Length') or 0) or None
        with tqdm(total=total, unit='B', unit_scale=True) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b''):
                f.write(chunk)
                bar.update(len(chunk))


def load_graph_def(path: str):
    """Parses a frozen GraphDef, explaining when the file is not one."""
    tf = _tf()
    graph_def = tf.GraphDef()
    with open(path, 'rb') as f:
        data = f.read()
    try:
        graph_def.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError or RuntimeError depending on backend
        raise EvalInputError(f'{path}: not a TensorFlow GraphDef ({e}); use ADM\'s {GRAPH_FILENAME} '
                             f'from {ADM_GRAPH_URL}') from None
    return graph_def


# ----------------------------------------------------------------------------- feature extraction

@dataclass
class SetFeatures:
    """What the metrics need of one image set: pool rows, pool and spatial Gaussian statistics, k-NN radii."""
    pool_NP: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    radii_N: Optional[np.ndarray] = None   # set by the evaluator


class _ChunkedMoments:
    """Feeds rows to a MomentAccumulator in large chunks on a background thread, so the float64
    covariance updates run as few big BLAS calls overlapping the next TF batch."""

    def __init__(self, chunk_rows: int = 2048):
        self.acc = MomentAccumulator()
        self.chunk_rows = chunk_rows
        self._buf, self._fill = None, 0
        self._pool = ThreadPoolExecutor(1)
        self._pending = None

    def add(self, x_nD: np.ndarray) -> None:
        """Buffers rows, handing each full chunk to the worker."""
        if self._buf is None:
            self._buf = np.empty((self.chunk_rows, x_nD.shape[1]), np.float32)
        while len(x_nD):
            take = min(len(x_nD), self.chunk_rows - self._fill)
            self._buf[self._fill:self._fill + take] = x_nD[:take]
            self._fill += take
            x_nD = x_nD[take:]
            if self._fill == self.chunk_rows:
                self._submit()

    def _submit(self) -> None:
        """Starts the update of the buffered rows (after the previous one finished)."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self.acc.update, self._buf[:self._fill].copy())
        self._fill = 0

    def stats(self):
        """Flushes and returns (mu, sigma)."""
        if self._fill:
            self._submit()
        if self._pending is not None:
            self._pending.result()
        self._pool.shutdown()
        return self.acc.stats()


class InceptionExtractor:
    """Runs ADM's Inception graph on uint8 NHWC batches."""

    def __init__(self, graph_path: str, sfid_channels: int = SFID_CHANNELS):
        tf = _tf()
        graph_def = load_graph_def(graph_path)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self._images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            try:
                pool, spatial, matmul = tf.import_graph_def(
                    graph_def, input_map={INPUT_NAME: self._images},
                    return_elements=[POOL_NAME, SPATIAL_NAME, LOGITS_MATMUL_NAME], name='inception')
            except ValueError as e:
                raise EvalInputError(f'{graph_path}: not ADM\'s Inception graph ({e}); need tensors {INPUT_NAME}, '
                                     f'{POOL_NAME}, {SPATIAL_NAME} and op {LOGITS_MATMUL_NAME}') from None
            self._pool = pool
            self._spatial = spatial[..., :sfid_channels]
            weight = matmul.inputs[1]
        self.sess = _session(self.graph)
        self.logits_weight_PK = np.asarray(self.sess.run(weight), np.float32)

    @property
    def pool_width(self) -> int:
        """Width P of the pool features."""
        return self.logits_weight_PK.shape[0]

    def run(self, images_NHWC: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(pool_NP, spatial_NS) float32 features of one batch of uint8 images."""
        pool, spatial = self.sess.run([self._pool, self._spatial],
                                      {self._images: images_NHWC.astype(np.float32)})
        return pool.reshape(len(pool), -1), spatial.reshape(len(spatial), -1)

    def extract(self, batches: Iterable[np.ndarray], count: int, progress=None) -> SetFeatures:
        """Features of count images arriving in batches; progress(n) is called after each batch."""
        pool_NP = np.empty((count, self.pool_width), np.float32)
        spatial = _ChunkedMoments()
        done = 0
        for batch in batches:
            pool_bP, spatial_bS = self.run(batch)
            if done + len(pool_bP) > count:
                raise EvalInputError(f'expected {count} images but the input yields more')
            pool_NP[done:done + len(pool_bP)] = pool_bP
            spatial.add(spatial_bS)
            done += len(pool_bP)
            if progress:
                progress(len(pool_bP))
        if done != count:
            raise EvalInputError(f'expected {count} images but the input yielded {done}')
        return SetFeatures(pool_NP, *gaussian_stats(pool_NP, chunk_rows=4096), *spatial.stats())


# ----------------------------------------------------------------------------- ADM distance block

def _sq_dists_graph(tf, u, v):
    """Graph ops for max(|u|^2 - 2 u.v^T + |v|^2, 0) in the dtype of u and v (ADM's formula)."""
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, False, True) + norm_v, 0.0)


class TFDistanceKernel:
    """ADM's DistanceBlock (same ops and blocks, so the same values): squared distances in float16, redone in float32
    when one is not finite; reductions run inside TF, so only (rows x k) values or two masks leave the graph."""

    block = ADM_BLOCK

    def __init__(self):
        tf = _tf()
        self.graph = tf.Graph()
        with self.graph.as_default():
            self._u = tf.placeholder(tf.float32, [None, None])
            self._v = tf.placeholder(tf.float32, [None, None])
            d16 = _sq_dists_graph(tf, tf.cast(self._u, tf.float16), tf.cast(self._v, tf.float16))
            d = tf.cond(tf.reduce_all(tf.math.is_finite(d16)),
                        lambda: tf.cast(d16, tf.float32),
                        lambda: _sq_dists_graph(tf, self._u, self._v))
            self._k = tf.placeholder(tf.int32, [])
            self._smallest = -tf.math.top_k(-d, k=self._k, sorted=False).values
            self._radii_u = tf.placeholder(tf.float32, [None])
            self._radii_v = tf.placeholder(tf.float32, [None])
            self._u_in = tf.reduce_any(d <= self._radii_v[None, :], axis=1)
            self._v_in = tf.reduce_any(d <= self._radii_u[:, None], axis=0)
        self.sess = _session(self.graph)
        self.name = 'adm_gpu' if tf.config.list_physical_devices('GPU') else 'adm_cpu'

    def smallest(self, u_nD, v_mD, k1: int) -> np.ndarray:
        """The k1 smallest squared distances from each u row to the v rows, (n, k1)."""
        return self.sess.run(self._smallest, {self._u: u_nD, self._v: v_mD, self._k: k1})

    def coverage(self, u_nD, radii_u_n, v_mD, radii_v_m) -> Tuple[np.ndarray, np.ndarray]:
        """(u_in_n, v_in_m): u row within some v ball; v row within some u ball (d <= radius)."""
        return tuple(self.sess.run([self._u_in, self._v_in], {
            self._u: u_nD, self._v: v_mD, self._radii_u: radii_u_n, self._radii_v: radii_v_m}))


# ----------------------------------------------------------------------------- stand-in graph

def write_standin_graph(path: str, pool_width: int = 16, spatial_channels: int = 10, num_classes: int = 12,
                        resize: int = 8, seed: int = 0, perturb_channel: Optional[int] = None) -> str:
    """A tiny frozen graph with ADM's tensor names (tests, benchmarks); perturb_channel shifts one mixed_6 channel."""
    tf = _tf()
    rng = np.random.default_rng(seed)
    w_conv = rng.normal(0, 0.5, (3, 3, 3, spatial_channels)).astype(np.float32)
    if perturb_channel is not None:
        w_conv[..., perturb_channel] += 0.5
    w_pool = rng.normal(0, 0.5, (1, 1, spatial_channels, pool_width)).astype(np.float32)
    w_logits = rng.normal(0, 0.5 / np.sqrt(pool_width), (pool_width, num_classes)).astype(np.float32)
    side = resize - 2
    graph = tf.Graph()
    with graph.as_default():
        jpeg = tf.placeholder(tf.uint8, [None, None, 3], name='DecodeJpeg')
        x = tf.expand_dims(tf.cast(jpeg, tf.float32), 0, name='ExpandDims')
        x = tf.raw_ops.ResizeBilinear(images=x, size=[resize, resize], name='ResizeBilinear')
        x = tf.multiply(tf.subtract(x, 128.0, name='Sub'), 1.0 / 128.0, name='Mul')
        conv = tf.nn.conv2d(x, tf.constant(w_conv), [1, 1, 1, 1], 'VALID', name='mixed_6/conv')
        h = tf.nn.relu(tf.nn.conv2d(tf.nn.relu(conv), tf.constant(w_pool), [1, 1, 1, 1], 'SAME'))
        pool = tf.nn.avg_pool(h, [1, side, side, 1], [1, 1, 1, 1], 'VALID', name='pool_3')
        flat = tf.reshape(pool, [1, pool_width], name='pool_3/_reshape')
        logits = tf.matmul(flat, tf.constant(w_logits, name='softmax/weights'), name='softmax/logits/MatMul')
        logits = tf.nn.bias_add(logits, tf.constant(np.ones(num_classes, np.float32), name='softmax/biases'),
                                name='softmax/logits')
        tf.nn.softmax(logits, name='softmax')
    with open(path, 'wb') as f:
        f.write(graph.as_graph_def().SerializeToString())
    return path
