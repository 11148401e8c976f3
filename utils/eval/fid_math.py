"""Deterministic numpy arithmetic of the ADM evaluator: FID/sFID, Inception Score, k-NN precision/recall
(TensorFlow only makes the features: inception_tf.py). Shapes: N reference rows, M sample rows, D width, K classes.
"""
from typing import Callable, Optional, Tuple

import numpy as np

SFID_CHANNELS = 7        # ADM keeps the first 7 channels of mixed_6/conv for sFID
IS_SPLIT_SIZE = 5000     # ADM's Inception Score split size
NHOOD_K = 3              # ADM's k for the k-NN manifold radii
ADM_BLOCK = 10000        # ADM's row/col batch size for distances (its float16 fallback is per block)


# ----------------------------------------------------------------------------- Gaussian statistics

class MomentAccumulator:
    """Streaming mean and unbiased covariance of feature rows in float64 (np.mean / np.cov(rowvar=False)); rows
    are shifted by the first batch's mean so the covariance loses no digits to cancellation."""

    def __init__(self):
        self.count = 0
        self._shift_D = self._sum_D = self._outer_DD = None

    def update(self, x_ND: np.ndarray) -> None:
        """Adds a batch of feature rows."""
        x_ND = np.asarray(x_ND).reshape(len(x_ND), -1)
        if len(x_ND) == 0:
            return
        if self._shift_D is None:
            D = x_ND.shape[1]
            self._shift_D = x_ND.mean(axis=0, dtype=np.float64)
            self._sum_D, self._outer_DD = np.zeros(D), np.zeros((D, D))
        xc_ND = np.subtract(x_ND, self._shift_D, dtype=np.float64)
        self._sum_D += xc_ND.sum(axis=0)
        self._outer_DD += xc_ND.T @ xc_ND
        self.count += len(x_ND)

    def stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """Returns (mu_D, sigma_DD); needs at least two rows."""
        if self.count < 2:
            raise ValueError(f'need at least 2 feature rows for a covariance, got {self.count}')
        mean_c_D = self._sum_D / self.count
        sigma_DD = (self._outer_DD - self.count * np.outer(mean_c_D, mean_c_D)) / (self.count - 1)
        return self._shift_D + mean_c_D, (sigma_DD + sigma_DD.T) / 2


def gaussian_stats(x_ND: np.ndarray, chunk_rows: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of feature rows, chunk_rows at a time (None: all at once); chunks keep many rows
    from needing a full float64 copy."""
    acc = MomentAccumulator()
    step = chunk_rows or max(1, len(x_ND))
    for start in range(0, len(x_ND), step):
        acc.update(x_ND[start:start + step])
    return acc.stats()


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (negative round-off eigenvalues set to 0)."""
    w_D, v_DD = np.linalg.eigh((sigma_DD + sigma_DD.T) / 2)
    return (v_DD * np.sqrt(np.clip(w_D, 0, None))) @ v_DD.T


def frechet_distance(mu1_D, sigma1_DD, mu2_D, sigma2_DD) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2), tr sqrt(s1 s2) from the eigenvalues of the symmetric
    s1^1/2 s2 s1^1/2 (the spectrum of s1 s2)."""
    mu1_D, mu2_D = np.atleast_1d(np.asarray(mu1_D, np.float64)), np.atleast_1d(np.asarray(mu2_D, np.float64))
    s1_DD, s2_DD = np.atleast_2d(np.asarray(sigma1_DD, np.float64)), np.atleast_2d(np.asarray(sigma2_DD, np.float64))
    if mu1_D.shape != mu2_D.shape or s1_DD.shape != s2_DD.shape or s1_DD.shape != (len(mu1_D),) * 2:
        raise ValueError(f'statistics do not match: mu {mu1_D.shape} vs {mu2_D.shape}, '
                         f'sigma {s1_DD.shape} vs {s2_DD.shape} (were they made with the same Inception graph?)')
    root1_DD = _psd_sqrt(s1_DD)
    eig_D = np.linalg.eigvalsh(root1_DD @ s2_DD @ root1_DD)
    tr_covmean = np.sqrt(np.clip(eig_D, 0, None)).sum()
    diff_D = mu1_D - mu2_D
    return float(diff_D @ diff_D + np.trace(s1_DD) + np.trace(s2_DD) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- Inception Score

def log_softmax(logits_NK: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    z_NK = np.asarray(logits_NK, np.float64)
    z_NK = z_NK - z_NK.max(axis=1, keepdims=True)
    return z_NK - np.log(np.exp(z_NK).sum(axis=1, keepdims=True))


def inception_score(probs_NK: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits (the last may be short) of exp(E_x KL(p(y|x) || p(y))), rows in the order given
    (ADM does not shuffle); zero probabilities add nothing."""
    p_NK = np.asarray(probs_NK, np.float64)
    if p_NK.ndim != 2 or len(p_NK) == 0:
        raise ValueError(f'expected a non-empty (N, K) probability array, got shape {p_NK.shape}')
    scores = []
    for start in range(0, len(p_NK), split_size):
        part_nK = p_NK[start:start + split_size]
        marginal_K = part_nK.mean(axis=0)
        with np.errstate(divide='ignore', invalid='ignore'):
            kl_nK = np.where(part_nK > 0, part_nK * (np.log(part_nK) - np.log(marginal_K)), 0.0)
        scores.append(np.exp(kl_nK.sum(axis=1).mean()))
    return float(np.mean(scores))


def split_order(n: int, seed: Optional[int]) -> np.ndarray:
    """Row order for the IS splits: a seeded permutation, or the identity (ADM) when seed is None."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)


# ----------------------------------------------------------------------------- precision / recall

def pairwise_sq_dists(u_ND: np.ndarray, v_MD: np.ndarray, dtype: str = 'float64') -> np.ndarray:
    """Squared distances max(|u|^2 - 2 u.v + |v|^2, 0) in the given precision; float32 result."""
    u_ND, v_MD = np.asarray(u_ND, dtype), np.asarray(v_MD, dtype)
    d_NM = u_ND @ v_MD.T
    d_NM *= -2.0
    d_NM += (u_ND * u_ND).sum(axis=1)[:, None]
    d_NM += (v_MD * v_MD).sum(axis=1)[None, :]
    return np.maximum(d_NM, 0.0, out=d_NM).astype(np.float32, copy=False)


class NumpyDistanceKernel:
    """Exact float32/float64 distance reductions, tile_rows x cols distances at a time (ADM's float16 kernel:
    inception_tf.TFDistanceKernel). A kernel gives, for a block of squared distances, the k smallest per row and
    which points fall inside the other side's balls: all the k-NN manifold needs."""

    block = ADM_BLOCK

    def __init__(self, dtype: str = 'float64', tile_rows: int = 1024):
        if dtype not in ('float32', 'float64'):
            raise ValueError(f'NumpyDistanceKernel supports float32/float64, not {dtype!r}')
        self.dtype, self.tile_rows = dtype, tile_rows
        self.name = dtype

    def _tiles(self, u_nD, v_mD):
        """Yields (row_slice, distance tile) over the block."""
        for r0 in range(0, len(u_nD), self.tile_rows):
            rows = slice(r0, min(r0 + self.tile_rows, len(u_nD)))
            yield rows, pairwise_sq_dists(u_nD[rows], v_mD, self.dtype)

    def smallest(self, u_nD, v_mD, k1: int) -> np.ndarray:
        """The k1 smallest squared distances from each u row to the v rows (unordered), (n, k1)."""
        out_nk = np.empty((len(u_nD), k1), np.float32)
        for rows, d_tm in self._tiles(u_nD, v_mD):
            out_nk[rows] = np.partition(d_tm, k1 - 1, axis=1)[:, :k1]
        return out_nk

    def coverage(self, u_nD, radii_u_n, v_mD, radii_v_m) -> Tuple[np.ndarray, np.ndarray]:
        """(u_in_n, v_in_m): u row within some v ball; v row within some u ball (d <= radius)."""
        u_in_n, v_in_m = np.zeros(len(u_nD), bool), np.zeros(len(v_mD), bool)
        for rows, d_tm in self._tiles(u_nD, v_mD):
            u_in_n[rows] = (d_tm <= radii_v_m[None, :]).any(axis=1)
            v_in_m |= (d_tm <= radii_u_n[rows][:, None]).any(axis=0)
        return u_in_n, v_in_m


def _blocks(n: int, size: int):
    """Consecutive slices of length size covering range(n)."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def knn_radii(x_ND: np.ndarray, k: int = NHOOD_K, kernel=None,
              progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """float32 (N,) squared distance from each row to its k-th nearest row (itself neighbour 0, as in ADM)."""
    kernel = kernel or NumpyDistanceKernel()
    n = len(x_ND)
    if n <= k:
        raise ValueError(f'k-NN radii with k={k} need at least {k + 1} feature rows, got {n}')
    best_Nk = np.full((n, k + 1), np.inf, np.float32)
    for rows in _blocks(n, kernel.block):
        for cols in _blocks(n, kernel.block):
            near_nk = kernel.smallest(x_ND[rows], x_ND[cols], min(k + 1, cols.stop - cols.start))
            merged = np.concatenate([best_Nk[rows], near_nk], axis=1)
            best_Nk[rows] = np.partition(merged, k, axis=1)[:, :k + 1]
            if progress:
                progress((rows.stop - rows.start) * (cols.stop - cols.start))
    return best_Nk.max(axis=1)


def manifold_precision_recall(ref_ND, ref_radii_N, sample_MD, sample_radii_M, kernel=None,
                              progress: Optional[Callable[[int], None]] = None) -> Tuple[float, float]:
    """(precision, recall) of the k-NN manifold estimate: the fraction of samples inside some (closed) reference
    ball, and of references inside some sample ball."""
    kernel = kernel or NumpyDistanceKernel()
    n, m = len(ref_ND), len(sample_MD)
    ref_radii_N = np.asarray(ref_radii_N, np.float32)
    sample_radii_M = np.asarray(sample_radii_M, np.float32)
    ref_in_N, sample_in_M = np.zeros(n, bool), np.zeros(m, bool)
    for rows in _blocks(n, kernel.block):
        for cols in _blocks(m, kernel.block):
            r_in, s_in = kernel.coverage(ref_ND[rows], ref_radii_N[rows], sample_MD[cols], sample_radii_M[cols])
            ref_in_N[rows] |= r_in
            sample_in_M[cols] |= s_in
            if progress:
                progress((rows.stop - rows.start) * (cols.stop - cols.start))
    return float(sample_in_M.mean()), float(ref_in_N.mean())
