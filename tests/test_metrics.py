"""convert.metrics against values worked out by hand (and AUC against its pairwise definition)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from convert import metrics

# 3 classes, 6 samples: cm = [[2,1,0],[0,1,1],[0,0,1]].
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def one_hot_probs(pred: list[int], k: int, p: float = 0.7) -> np.ndarray:
    probs = np.full((len(pred), k), (1 - p) / (k - 1))
    probs[np.arange(len(pred)), pred] = p
    return probs


def test_confusion_matrix_rows_are_truth():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="0..2"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="2 labels"):
        metrics.confusion_matrix([0, 1], [0], 3)


def test_per_class_by_hand():
    pc = metrics.per_class(metrics.confusion_matrix(Y_TRUE, Y_PRED, 3))
    np.testing.assert_allclose(pc["precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(pc["recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(pc["specificity"], [3 / 3, 3 / 4, 4 / 5])
    np.testing.assert_allclose(pc["f1"], [0.8, 0.5, 2 / 3])
    assert pc["support"].tolist() == [3, 2, 1]


def test_accuracy_macro_f1_kappa_by_hand():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert metrics.macro_f1(cm) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # p_o = 4/6; p_e = (3*2 + 2*2 + 1*2) / 36 = 1/3 -> kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert metrics.cohen_kappa(cm) == pytest.approx(0.5)


def test_kappa_textbook_example():
    # Two raters, 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o 0.7, p_e 0.5, kappa 0.4.
    assert metrics.cohen_kappa(np.array([[20, 5], [10, 15]])) == pytest.approx(0.4)


def test_kappa_perfect_chance_and_undefined():
    assert metrics.cohen_kappa(np.diag([5, 7, 3])) == pytest.approx(1.0)
    # Predictions independent of truth: every row is proportional to the column totals -> kappa 0.
    assert metrics.cohen_kappa(np.array([[2, 2], [3, 3]])) == pytest.approx(0.0)
    assert metrics.cohen_kappa(np.array([[4, 0], [0, 0]])) is None
    assert metrics.cohen_kappa(np.zeros((2, 2))) is None


def test_zero_division_and_absent_classes():
    # Class 2 never occurs nor is predicted: excluded from macro F1 (else the mean would be 2/3 of it).
    cm = metrics.confusion_matrix([0, 1], [0, 1], 3)
    assert metrics.macro_f1(cm) == pytest.approx(1.0)
    # Class 1 is predicted but never true: precision 0, recall 0 (no positives), F1 0.
    pc = metrics.per_class(metrics.confusion_matrix([0, 0], [0, 1], 2))
    assert pc["precision"].tolist() == [1.0, 0.0]
    assert pc["recall"].tolist() == [0.5, 0.0]


def test_average_ranks_share_ties():
    np.testing.assert_allclose(metrics.average_ranks(np.array([30, 10, 20, 20])), [4, 1, 2.5, 2.5])
    np.testing.assert_allclose(metrics.average_ranks(np.array([5, 5, 5])), [2, 2, 2])


def test_auc_known_values():
    assert metrics.binary_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert metrics.binary_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert metrics.binary_auc([1, 0, 1, 0, 1], [0.5] * 5) == 0.5
    # pos {0.8, 0.4} vs neg {0.6, 0.2}: 3 of 4 pairs ordered -> 0.75
    assert metrics.binary_auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    # pos {0.5, 0.9} vs neg {0.5, 0.1}: 1 tie (1/2) + 3 ordered -> 3.5 / 4
    assert metrics.binary_auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)
    assert metrics.binary_auc([1, 1], [0.3, 0.4]) is None


def test_auc_equals_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * pos, 1)  # rounding makes many ties
    diff = scores[pos][:, None] - scores[~pos][None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert metrics.binary_auc(pos, scores) == pytest.approx(expected)


def test_macro_auc_skips_undefined_classes():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    # Class 0 vs rest: positives {0.9, 0.6} above negative 0.2 -> 1.0; class 1: positive 0.8 above {0.1, 0.4}
    # -> 1.0; class 2 has no positive -> left out.
    assert metrics.macro_auc([0, 1, 0], probs) == pytest.approx(1.0)
    assert metrics.macro_auc([0, 0], probs[:2]) is None


def test_ece_by_hand():
    # Confidence 0.9 and 90% correct: perfectly calibrated.
    probs = np.tile([0.9, 0.1], (10, 1))
    assert metrics.expected_calibration_error([0] * 9 + [1], probs) == pytest.approx(0.0)
    # Two bins: {0.95, 0.95} both right -> gap 0.05; {0.55, 0.55} one right -> gap 0.05. ECE 0.05.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    assert metrics.expected_calibration_error([0, 0, 0, 1], probs) == pytest.approx(0.05)
    # Confident and always wrong: ECE 1.
    assert metrics.expected_calibration_error([1, 1], np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)


def test_ece_uses_15_bins():
    # 0.61 lies in (0.600, 0.667], 0.68 in (0.667, 0.733]: separate bins with 15 (10 bins would merge them).
    probs = np.array([[0.61, 0.39], [0.68, 0.32]])
    assert metrics.expected_calibration_error([0, 1], probs) == pytest.approx((0.39 + 0.68) / 2)
    assert metrics.expected_calibration_error([0, 1], probs, bins=10) == pytest.approx(abs(0.5 - 0.645))


def test_summary_is_consistent_and_json_ready():
    labels = ["a", "b", "c"]
    s = metrics.summary(Y_TRUE, one_hot_probs(Y_PRED, 3), labels)
    json.dumps(s)
    cm = np.array(s["confusion"])
    assert s["n"] == 6 == cm.sum()
    assert s["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert s["kappa"] == pytest.approx(0.5)
    assert list(s["per_class"]) == labels
    assert s["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "specificity": 0.75,
                                                  "f1": 0.5, "support": 2})
    # Every prediction has confidence 0.7 and 4/6 are right -> ECE |0.667 - 0.7|.
    assert s["ece"] == pytest.approx(abs(4 / 6 - 0.7))


def test_summary_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        metrics.summary([0, 1], np.ones((3, 2)) / 2, ["a", "b"])


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score, no continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(k: int, n: int, low: float, high: float):
    lo, hi = metrics.wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_interval_edges():
    lo, hi = metrics.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)  # mirror of 0/10 -> (0, 0.2775)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        metrics.wilson_interval(5, 4)


def test_mcnemar_exact_by_hand() -> None:
    """Two-sided exact binomial test of the discordant pairs: 8 vs 3 -> 2 * P(X <= 3 | n=11) = 2 * 232/2048."""
    assert metrics.mcnemar_exact(8, 3) == pytest.approx(2 * (1 + 11 + 55 + 165) / 2048)
    assert metrics.mcnemar_exact(3, 8) == metrics.mcnemar_exact(8, 3)
    assert metrics.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert metrics.mcnemar_exact(0, 0) == 1.0 and metrics.mcnemar_exact(4, 4) == 1.0
    with pytest.raises(ValueError):
        metrics.mcnemar_exact(-1, 2)


def test_auc_interval_matches_hanley_mcneil():
    """Hanley and McNeil (1982), Table 2: AUC 0.8 from 50 positives and 50 negatives has SE 0.0445."""
    lo, hi = metrics.auc_interval(0.8, 50, 50)
    assert (hi - lo) / 2 == pytest.approx(metrics.Z95 * 0.0445, abs=0.001)
    assert (lo + hi) / 2 == pytest.approx(0.8)
    assert metrics.auc_interval(1.0, 5, 5) == (1.0, 1.0)
    narrow, wide = metrics.auc_interval(0.9, 500, 500), metrics.auc_interval(0.9, 20, 20)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        metrics.auc_interval(0.8, 0, 10)


def test_balanced_point_is_the_best_common_rate():
    """Tumour scores 0.2, 0.6, 0.9 against healthy 0.1, 0.3, 0.7: the threshold 0.6 finds 2 of 3 tumours and
    spares 2 of 3 healthy slices, and no threshold does better for both at once; a perfect split gives 1."""
    assert metrics.best_common_rate([0.2, 0.6, 0.9], [0.1, 0.3, 0.7]) == pytest.approx(2 / 3)
    assert metrics.best_common_rate([0.8, 0.9], [0.1, 0.2]) == 1.0
    assert metrics.best_common_rate([0.1], [0.9]) == 0.0


def test_separation_rows_pair_every_tumour_group_with_every_healthy_group():
    """Without row names the groups are the sets; scores are 1 - P(notumor); the counts and AUC follow."""
    from convert.external import separation_rows

    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    items = [{"set": "A", "expected": "tumour", "probabilities": [0.8, 0.0, 0.2, 0.0]},
             {"set": "A", "expected": "glioma", "probabilities": [0.4, 0.0, 0.6, 0.0]},
             {"set": "A", "expected": "healthy", "probabilities": [0.1, 0.0, 0.9, 0.0]},
             {"set": "B", "expected": "healthy", "probabilities": [0.5, 0.0, 0.5, 0.0]}]
    rows = {(r["tumours"], r["healthy"]): r for r in separation_rows(items, labels)}
    assert set(rows) == {("A", "A"), ("A", "B")}
    assert rows["A", "A"]["auc"] == 1.0 and rows["A", "A"]["balanced"] == 1.0
    assert rows["A", "B"]["auc"] == 0.5 and (rows["A", "B"]["n_tumours"], rows["A", "B"]["n_healthy"]) == (2, 1)


def test_variant_separation_rows_hold_the_sequence_fixed():
    """T1 tumours against T1 normals only; T1C+ has no normals of its own and gives no row, and a tumour
    scored high on a sequence without normals does not enter another sequence's AUC."""
    from convert.external import variant_separation_rows

    labels = ["glioma", "meningioma", "notumor", "pituitary"]

    def item(variant: str, expected: str, p_notumor: float) -> dict:
        return {"set": "F", "variant": variant, "expected": expected,
                "probabilities": [1 - p_notumor, 0.0, p_notumor, 0.0]}

    items = [item("T1", "tumour", 0.3), item("T1", "tumour", 0.7), item("T1", "healthy", 0.6),
             item("T1C+", "tumour", 0.0), item("", "healthy", 0.9)]
    (row,) = variant_separation_rows(items, labels, {"F": {"tumour": "F tumours", "healthy": "F normals"}})
    assert (row["set"], row["variant"], row["tumours"], row["healthy"]) == ("F", "T1", "F tumours", "F normals")
    assert (row["n_tumours"], row["n_healthy"]) == (2, 1) and row["auc"] == 0.5
