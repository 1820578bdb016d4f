"""Classification metrics in plain numpy, so evaluation needs nothing beyond what training already installs.

Labels are integer class indices 0..K-1; ``probs`` is [N, K] (rows sum to 1). Conventions, chosen to match
what readers of scikit-learn reports expect:

- precision of a class never predicted, recall of a class absent from the truth: 0.0;
- macro averages run over the classes present in the truth or the predictions (a class missing from a
  de-duplicated subset does not drag the average down with an undefined 0);
- values that have no meaning for the data (AUC with a single class present, kappa when chance agreement
  is total) are None, which JSON writes as null.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

ECE_BINS = 15


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts [K, K] with true classes as rows and predicted classes as columns."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of correct predictions (0.0 for no samples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else 0.0


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (sensitivity), specificity, F1 and support from a confusion matrix."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    predicted, actual, total = cm.sum(axis=0), cm.sum(axis=1), cm.sum()
    fp, fn = predicted - tp, actual - tp
    tn = total - tp - fp - fn
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    specificity = np.divide(tn, tn + fp, out=np.zeros_like(tp), where=(tn + fp) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "specificity": specificity, "f1": f1,
            "support": actual.astype(np.int64)}


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in the truth or the predictions."""
    cm = np.asarray(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(per_class(cm)["f1"][present].mean()) if present.any() else 0.0


def cohen_kappa(cm: np.ndarray) -> float | None:
    """Agreement beyond chance: (p_o - p_e) / (1 - p_e); None when p_e is 1 (one class in both)."""
    cm = np.asarray(cm, np.float64)
    n = cm.sum()
    if n == 0:
        return None
    p_o = np.trace(cm) / n
    p_e = float(cm.sum(axis=0) @ cm.sum(axis=1)) / (n * n)
    if np.isclose(p_e, 1.0):
        return None
    return float((p_o - p_e) / (1.0 - p_e))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:], [x.size])) - 1
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(x.size, np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def binary_auc(positive: Sequence[bool], scores: Sequence[float]) -> float | None:
    """ROC AUC by the Mann-Whitney statistic (ties count one half); None without both positives and negatives."""
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.asarray(scores, np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(y_true: Sequence[int], probs: np.ndarray) -> float | None:
    """Mean one-vs-rest ROC AUC over the classes for which it is defined (None if for none)."""
    t, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    aucs = [binary_auc(t == k, probs[:, k]) for k in range(probs.shape[1])]
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None


def expected_calibration_error(y_true: Sequence[int], probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width bins of the top probability, weighted by bin size.

    Bins are (i/bins, (i+1)/bins], the first one closed at 0, as in Guo et al. (2017).
    """
    t, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    if t.size == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == t).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    # Per bin, |sum(correct) - sum(confidence)| = n_bin * |accuracy - confidence|.
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / t.size)


def summary(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Every metric above for one set of predictions, JSON-ready (predicted class = arg-max)."""
    t, probs = np.asarray(y_true, np.int64), np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape != (t.size, len(labels)):
        raise ValueError(f"probabilities of shape {probs.shape} do not match {t.size} samples x {len(labels)} labels")
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(t, pred, len(labels))
    pc = per_class(cm)
    return {
        "n": int(t.size),
        "accuracy": accuracy(t, pred),
        "macro_f1": macro_f1(cm),
        "kappa": cohen_kappa(cm),
        "macro_auc": macro_auc(t, probs),
        "ece": expected_calibration_error(t, probs),
        "per_class": {name: {key: (int(v[k]) if key == "support" else float(v[k])) for key, v in pc.items()}
                      for k, name in enumerate(labels)},
        "labels": list(labels),
        "confusion": cm.tolist(),
    }


#: Two-sided 95% normal quantile, for the Wilson intervals of the external-validation tables.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (Wilson 1927; Newcombe 1998, method 3).

    Used instead of the normal (Wald) interval because external sets are small and their rates sit near 0 or
    1, where Wald collapses to zero width or leaves [0, 1]. Without samples the rate is unknown: (0, 1).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def auc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """Normal 95% interval of a ROC AUC from ``n_pos`` positives and ``n_neg`` negatives (Hanley and McNeil
    1982, exponential approximation of the variance), clipped to [0, 1].

    Why this one: it needs only the AUC and the two counts, so old reports can be re-read; on the external
    sets here (155-1,303 images a side) its bounds lie within 0.005 of DeLong's (checked on both shipped
    models' reports), which is precision enough to say whether two models separate tumours from healthy
    slices differently.
    """
    if n_pos < 1 or n_neg < 1 or not 0.0 <= auc <= 1.0:
        raise ValueError(f"need an AUC in [0, 1] and both counts >= 1, got {auc}, {n_pos}, {n_neg}")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def best_common_rate(tumours: Sequence[float], healthy: Sequence[float]) -> float:
    """The most that tumours found and healthy spared reach *at once* at any one threshold on the tumour
    score (max over thresholds of min(sensitivity, specificity)): what the best border could give a pair of
    equal bars, e.g. 90% found and 90% spared."""
    t, h = np.sort(np.asarray(tumours, np.float64)), np.sort(np.asarray(healthy, np.float64))
    cuts = np.concatenate([np.unique(np.concatenate([t, h])), [np.inf]])
    found = 1.0 - np.searchsorted(t, cuts, side="left") / t.size
    spared = np.searchsorted(h, cuts, side="left") / h.size
    return float(np.minimum(found, spared).max())


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of two models on the same images: ``only_a`` images only model A gets
    right, ``only_b`` only model B (McNemar 1947; the exact binomial form).

    Why exact: two versions of one model differ on a handful of test images, where the chi-squared
    approximation is poor; the binomial test of the smaller count against n = only_a + only_b at p = 1/2,
    doubled and capped at 1, is exact. No discordant image: no evidence of a difference, p = 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"need counts >= 0, got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))
