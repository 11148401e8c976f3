"""Quality figures of the digits demo beyond class consistency: FID, precision / recall, diversity, copy rate.

FID and precision / recall use the evaluator's maths (utils/eval/fid_math.py) in the hidden layer of a small digit
classifier instead of Inception's pool layer. Inputs are pixel features (scripts/demo_score.py); no file is read.

Shapes: N reference rows, M sample rows, P = 64 pixel features, F = FEATURE_WIDTH hidden features.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
from scipy.spatial.distance import cdist, pdist
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from utils.eval.fid_math import NHOOD_K, frechet_distance, gaussian_stats, knn_radii, manifold_precision_recall

FEATURE_WIDTH = 64        # hidden units of the feature net: the feature space of FID and precision / recall
COPY_PERCENTILE = 5.0     # a sample is a copy when it is nearer to a training digit than 95% of real val digits are


# ----------------------------------------------------------------------------- features
def hidden_features(net, x_NP: np.ndarray) -> np.ndarray:
    """The net's hidden layer, relu(x W0 + b0) -> (N, F) float64."""
    h_NF = np.asarray(x_NP, np.float64) @ net.coefs_[0] + net.intercepts_[0]
    return np.maximum(h_NF, 0.0)


# ----------------------------------------------------------------------------- distribution
def fid(ref_ND: np.ndarray, x_MD: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (fid_math's estimator)."""
    return frechet_distance(*gaussian_stats(ref_ND), *gaussian_stats(x_MD))


def precision_recall(ref_ND: np.ndarray, x_MD: np.ndarray, k: int = NHOOD_K) -> Tuple[float, float]:
    """k-NN manifold (precision, recall) of samples against references (ADM's k = 3 by default)."""
    ref_ND, x_MD = np.asarray(ref_ND, np.float32), np.asarray(x_MD, np.float32)
    return manifold_precision_recall(ref_ND, knn_radii(ref_ND, k), x_MD, knn_radii(x_MD, k))


# ----------------------------------------------------------------------------- diversity
def mean_pairwise_distance(x_MD: np.ndarray) -> float:
    """Mean Euclidean distance over the M(M-1)/2 unordered pairs of rows (0 for fewer than two rows)."""
    if len(x_MD) < 2:
        return 0.0
    return float(pdist(np.asarray(x_MD, np.float64)).mean())   # differences first: identical rows give exactly 0


def within_class_spread(x_MD: np.ndarray, labels_M: np.ndarray) -> float:
    """mean_pairwise_distance within each class, averaged over classes (each class weighs the same)."""
    return float(np.mean([mean_pairwise_distance(x_MD[labels_M == c]) for c in np.unique(labels_M)]))


def diversity_ratio(x_MD: np.ndarray, labels_M: np.ndarray, real_ND: np.ndarray, real_labels_N: np.ndarray) -> float:
    """Samples' within-class spread over the real digits' (1.0 = as diverse as real digits, 0 = one image a class)."""
    return within_class_spread(x_MD, labels_M) / within_class_spread(real_ND, real_labels_N)


# ----------------------------------------------------------------------------- memorisation
def nearest_distance(x_MD: np.ndarray, ref_ND: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of x to its nearest row of ref -> (M,)."""
    return cdist(np.asarray(x_MD, np.float64), np.asarray(ref_ND, np.float64)).min(axis=1)


def copy_threshold(real_nn_N: np.ndarray, percentile: float = COPY_PERCENTILE) -> float:
    """The distance below which a sample counts as a copy: a low percentile of real held-out nearest distances."""
    return float(np.percentile(real_nn_N, percentile))


def copy_rate(sample_nn_M: np.ndarray, threshold: float) -> float:
    """Share of samples strictly nearer to their nearest training digit than the threshold."""
    return float((np.asarray(sample_nn_M) < threshold).mean())


# ----------------------------------------------------------------------------- the judge
@dataclass
class Judge:
    """What is fitted or measured once on the real digits, to score any set of digit images against."""
    clf: Any                    # logistic regression: class consistency
    net: Any                    # MLP: its hidden layer is the feature space of FID / precision / recall / diversity
    train_h: np.ndarray         # (N, F) train hidden features: the FID / precision / recall reference
    val_h: np.ndarray           # (Nv, F) val hidden features: the diversity yardstick
    val_y: np.ndarray           # (Nv,)
    copy_ref: np.ndarray        # (N, P) train pixel features (tokenizer reconstructions when given): copy reference
    copy_threshold: float       # COPY_PERCENTILE of the val digits' nearest-copy_ref pixel distances
    classifier_acc_real: float  # accuracy of clf on the val digits
    feature_net_acc_real: float  # accuracy of net on the val digits


def fit_judge(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              train_rec: Optional[np.ndarray] = None, val_rec: Optional[np.ndarray] = None, seed: int = 0) -> Judge:
    """Train both classifiers on the train digits and measure the val digits' yardsticks. train_rec / val_rec: the
    digits through the tokenizer; a memorised digit comes out blurred like them, so copies are looked for among
    them (docs/DEMO.md), else among the raw digits."""
    clf = LogisticRegression(max_iter=5000, random_state=seed).fit(train_x, train_y)
    net = MLPClassifier(hidden_layer_sizes=(FEATURE_WIDTH,), activation='relu', alpha=1e-4, max_iter=1000,
                        random_state=seed).fit(train_x, train_y)
    copy_ref_NP = np.asarray(train_x if train_rec is None else train_rec, np.float64)
    copy_val_NP = val_x if val_rec is None else val_rec
    return Judge(clf=clf, net=net, train_h=hidden_features(net, train_x), val_h=hidden_features(net, val_x),
                 val_y=np.asarray(val_y), copy_ref=copy_ref_NP,
                 copy_threshold=copy_threshold(nearest_distance(copy_val_NP, copy_ref_NP)),
                 classifier_acc_real=float((clf.predict(val_x) == val_y).mean()),
                 feature_net_acc_real=float((net.predict(val_x) == val_y).mean()))


def score(judge: Judge, x_MP: np.ndarray, labels_M: np.ndarray, reference: str = 'train') -> Dict[str, float]:
    """Every figure of one set of images with their asked-for classes; reference: the real digits FID and precision /
    recall compare with, 'train' (what the demo reports) or 'val' (the split the defaults were chosen on)."""
    ref_NF = {'train': judge.train_h, 'val': judge.val_h}[reference]
    h_MF = hidden_features(judge.net, x_MP)
    p, r = precision_recall(ref_NF, h_MF)
    return dict(consistency=float((judge.clf.predict(x_MP) == labels_M).mean()),
                fid=fid(ref_NF, h_MF), precision=p, recall=r,
                diversity=diversity_ratio(h_MF, labels_M, judge.val_h, judge.val_y),
                copy_rate=copy_rate(nearest_distance(x_MP, judge.copy_ref), judge.copy_threshold))
