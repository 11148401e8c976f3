"""Invariants of the evaluator arithmetic (utils/eval/fid_math.py): FID, Inception Score, k-NN precision/recall."""
import numpy as np
import pytest
from scipy import linalg

from utils.eval import fid_math as fm


def _random_cov(rng, d):
    a = rng.normal(size=(d, 3 * d))
    return a @ a.T / (3 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- statistics and FID

def test_moment_accumulator_matches_numpy_over_uneven_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(103, 6)).astype(np.float32)
    acc = fm.MomentAccumulator()
    for a, b in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        acc.update(x[a:b])
    mu, sigma = acc.stats()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert acc.count == 103


def test_moment_accumulator_needs_two_rows():
    acc = fm.MomentAccumulator()
    acc.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match='at least 2'):
        acc.stats()


def test_fid_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert fm.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_fid_matches_sqrtm_definition_and_is_symmetric():
    rng = np.random.default_rng(2)
    d = 9
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = fm.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert fm.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)
    assert fm.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_rejects_mismatched_widths():
    with pytest.raises(ValueError, match='same Inception graph'):
        fm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_uniform_is_one():
    assert fm.inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)


@pytest.mark.parametrize('k', [1, 4, 10])
def test_inception_score_one_hot_spread_over_k_classes_is_k(k):
    probs = np.eye(k)[np.arange(6 * k) % k]
    assert fm.inception_score(probs) == pytest.approx(k)


def test_inception_score_splits_are_consecutive_rows():
    probs = np.eye(8)[np.repeat(np.arange(8), 5)]          # class-sorted: 5 rows per class
    assert fm.inception_score(probs, split_size=40) == pytest.approx(8)
    assert fm.inception_score(probs, split_size=20) == pytest.approx(4)   # each split sees 4 classes
    assert fm.inception_score(probs, split_size=5) == pytest.approx(1)    # each split one class


def test_shuffled_splits_undo_class_sorting():
    probs = np.eye(10)[np.repeat(np.arange(10), 100)]       # 1000 class-sorted rows
    sorted_is = fm.inception_score(probs, split_size=100)
    shuffled_is = fm.inception_score(probs[fm.split_order(len(probs), seed=0)], split_size=100)
    assert sorted_is == pytest.approx(1.0)
    assert shuffled_is > 8.0


def test_split_order_is_seeded_permutation_or_identity():
    np.testing.assert_array_equal(fm.split_order(7, None), np.arange(7))
    a, b = fm.split_order(50, 3), fm.split_order(50, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    assert not np.array_equal(a, fm.split_order(50, 4))


def test_log_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = np.exp(fm.log_softmax(logits))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[1], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())


# ----------------------------------------------------------------------------- precision / recall

def test_pairwise_sq_dists_match_brute_force():
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    want = ((u[:, None] - v[None]) ** 2).sum(-1)
    np.testing.assert_allclose(fm.pairwise_sq_dists(u, v, 'float64'), want, rtol=1e-6, atol=1e-6)


def test_knn_radii_on_a_line():
    x = np.arange(10, dtype=np.float64)[:, None]             # neighbour 0 is the point itself
    r = fm.knn_radii(x, k=3)
    assert r[0] == 9 and r[9] == 9                            # ends: 3rd neighbour 3 away
    assert r[5] == 4                                          # middle: neighbours at 1, 1, 2


def test_knn_radii_independent_of_block_and_tile_size():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 5))
    big = fm.knn_radii(x, kernel=fm.NumpyDistanceKernel('float64'))
    small_kernel = fm.NumpyDistanceKernel('float64', tile_rows=3)
    small_kernel.block = 7
    np.testing.assert_array_equal(fm.knn_radii(x, kernel=small_kernel), big)


def test_knn_radii_needs_more_rows_than_k():
    with pytest.raises(ValueError, match='at least 4'):
        fm.knn_radii(np.zeros((3, 2)), k=3)


def _pr(ref, sample, kernel=None):
    kernel = kernel or fm.NumpyDistanceKernel('float64')
    return fm.manifold_precision_recall(ref, fm.knn_radii(ref, kernel=kernel), sample,
                                        fm.knn_radii(sample, kernel=kernel), kernel)


def test_precision_recall_identical_sets():
    x = np.random.default_rng(5).normal(size=(40, 6))
    assert _pr(x, x) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    rng = np.random.default_rng(6)
    assert _pr(rng.normal(size=(30, 6)), rng.normal(size=(40, 6)) + 100.0) == (0.0, 0.0)


def test_precision_recall_sample_covers_one_of_two_clusters():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(25, 4)), rng.normal(size=(25, 4)) + 50.0
    precision, recall = _pr(np.concatenate([a, b]), a)
    assert precision == 1.0 and recall == 0.5
    precision, recall = _pr(a, np.concatenate([a, b]))       # roles swapped
    assert precision == 0.5 and recall == 1.0


def test_precision_recall_independent_of_block_and_dtype():
    rng = np.random.default_rng(8)
    ref, sample = rng.normal(size=(45, 8)), rng.normal(size=(31, 8)) + 0.3
    want = _pr(ref, sample)
    tiny = fm.NumpyDistanceKernel('float32', tile_rows=4)
    tiny.block = 10
    assert _pr(ref, sample, tiny) == want
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0


def test_precision_recall_use_the_third_neighbour_as_adm():
    """Four points on a line and the same four shifted by 7.5; squared radii worked out by hand.

    ref 0, 1, 2, 4: sorted squared distances (the point itself first) are 0,1,4,16 | 0,1,1,9 | 0,1,4,4 | 0,4,9,16,
    so the 3rd-neighbour radii are 16, 9, 4, 16 (the 2nd-neighbour ones 4, 1, 4, 9). The samples 7.5, 8.5, 9.5,
    11.5 have the same radii. Only sample 7.5 lies in a reference ball (ref 4: 3.5^2 = 12.25 <= 16) and only ref 4
    in a sample ball (sample 7.5: 12.25 <= 16): precision = recall = 1/4. With k = 2 no ball reaches across
    (the widest, 9, is < 12.25), so both would be 0; k = 4 needs five rows.
    """
    ref = np.array([[0.0], [1.0], [2.0], [4.0]])
    sample = ref + 7.5
    assert fm.knn_radii(ref).tolist() == [16, 9, 4, 16]
    assert fm.knn_radii(sample).tolist() == [16, 9, 4, 16]
    assert fm.knn_radii(ref, k=2).tolist() == [4, 1, 4, 9]
    assert _pr(ref, sample) == (0.25, 0.25)
    assert fm.manifold_precision_recall(ref, fm.knn_radii(ref, k=2), sample, fm.knn_radii(sample, k=2)) == (0.0, 0.0)


def test_numpy_kernel_rejects_float16():
    with pytest.raises(ValueError, match='float32/float64'):
        fm.NumpyDistanceKernel('float16')
