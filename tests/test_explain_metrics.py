"""Each explanation metric on hand-made maps whose answer is known in advance."""
from __future__ import annotations

import numpy as np
import pytest

from convert import explain_metrics as em


def square_mask(shape=(224, 224), top=100, left=100, side=20) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top:top + side, left:left + side] = True
    return m


def spot(shape, y, x) -> np.ndarray:
    h = np.zeros(shape, np.float32)
    h[y, x] = 1.0
    return h


def test_tolerance_is_15px_at_224_and_scales_with_the_longer_side():
    assert em.tolerance((224, 224)) == 15.0
    assert em.tolerance((448, 300)) == 30.0
    assert em.tolerance((256, 512, 3)) == pytest.approx(15 * 512 / 224)


def test_pointing_peak_inside_near_and_far_from_the_mask():
    mask = square_mask()  # rows/cols 100..119
    assert em.pointing_hit(spot(mask.shape, 110, 110), mask)  # inside
    assert em.pointing_hit(spot(mask.shape, 110, 134), mask)  # 15 px right of column 119: on the tolerance
    assert not em.pointing_hit(spot(mask.shape, 110, 135), mask)  # 16 px: out
    assert not em.pointing_hit(spot(mask.shape, 10, 10), mask)
    assert not em.pointing_hit(np.zeros(mask.shape), mask)  # a map with no heat points nowhere
    big = square_mask((448, 448), 200, 200, 40)  # 448 px: tolerance 30 px
    assert em.pointing_hit(spot(big.shape, 220, 269), big) and not em.pointing_hit(spot(big.shape, 220, 270), big)


def test_peak_of_a_plateau_is_its_middle_and_distance_is_euclidean():
    h = np.zeros((9, 9))
    h[2, 2:7] = 1.0  # five equal maxima in a row
    assert em.peak(h) == (2, 4)
    assert em.peak(np.zeros((3, 3))) is None
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    assert em.distance_to_mask((3, 4), mask) == 5.0
    assert em.distance_to_mask((0, 0), mask) == 0.0
    assert em.distance_to_mask((0, 0), np.zeros((4, 4))) == float("inf")


def test_energy_and_mass_ratio():
    head = np.zeros((100, 100), bool)
    head[10:90, 10:90] = True  # 6400 px
    mask = np.zeros_like(head)
    mask[20:36, 20:36] = True  # 256 px: 1/25 of the head
    uniform = head.astype(np.float32)
    assert em.energy_inside(uniform, mask) == pytest.approx(256 / 6400)
    assert em.mass_ratio(uniform, mask, head) == pytest.approx(1.0)
    on_lesion = mask.astype(np.float32)
    assert em.energy_inside(on_lesion, mask) == 1.0
    assert em.mass_ratio(on_lesion, mask, head) == pytest.approx(25.0)
    half = np.where(mask, 24.0, uniform)  # 256 x 24 inside = 6144 x 1 outside: half the mass on the lesion
    assert em.energy_inside(half, mask) == pytest.approx(0.5)
    assert em.mass_ratio(half, mask, head) == pytest.approx(12.5)
    assert em.mass_ratio(np.zeros_like(uniform), mask, head) == 0.0
    # Heat and mask outside the head are not counted: the border cannot dilute or inflate the ratio.
    outside = uniform.copy()
    outside[:5, :5] = 100.0
    wider_mask = mask.copy()
    wider_mask[:5, :5] = True
    assert em.mass_ratio(outside, wider_mask, head) == pytest.approx(1.0)
    assert np.isnan(em.mass_ratio(uniform, np.zeros_like(mask), head))


def test_pearson():
    rng = np.random.default_rng(0)
    a = rng.random((12, 12))
    assert em.pearson(a, a) == pytest.approx(1.0)
    assert em.pearson(a, 3 * a + 2) == pytest.approx(1.0)
    assert em.pearson(a, -a) == pytest.approx(-1.0)
    assert np.isnan(em.pearson(a, np.ones_like(a)))
    with pytest.raises(ValueError, match="different sizes"):
        em.pearson(a, a[:5])


def test_r_with_average_by_hand():
    """Maps [1,0,0], [1,1,0], [1,0,1] average [1, 1/3, 1/3]: the first is that shape (r 1), the others share
    half of it (r 0.5); the same map every time gives 1 each; a flat map gives NaN."""
    r = em.r_with_average([np.array([1.0, 0, 0]), np.array([1.0, 1, 0]), np.array([1.0, 0, 1])])
    assert r == pytest.approx([1.0, 0.5, 0.5])
    same = np.arange(9.0).reshape(3, 3)
    assert em.r_with_average([same, same]) == pytest.approx([1.0, 1.0])
    assert np.isnan(em.r_with_average([np.ones(3), np.array([0.0, 1, 2])])[0])


def test_heat_order_hottest_first_and_ties_shuffled():
    h = np.zeros((4, 4))
    h[3, 3], h[0, 1] = 1.0, 0.5
    order = em.heat_order(h, np.random.default_rng(0))
    assert sorted(order) == list(range(16)) and order[0] == 15 and order[1] == 1
    tails = {tuple(em.heat_order(h, np.random.default_rng(s))[2:]) for s in range(5)}
    assert len(tails) > 1  # the zeros are not removed in scan order


def evidence_score(evidence: np.ndarray):
    """A stand-in model: its score is the share of the evidence pixels still at their original value 1."""
    return lambda x: float((x.reshape(evidence.shape)[evidence] == 1).mean())


def test_deletion_and_insertion_auc_of_a_perfect_and_a_reversed_ordering():
    n = 100
    image = np.ones((10, 10), np.uint8)
    evidence = np.zeros((10, 10), bool)
    evidence.flat[:20] = True  # 20 of 100 pixels carry the evidence
    score = evidence_score(evidence)
    perfect = np.arange(n)  # evidence first
    reverse = perfect[::-1]
    baseline = np.zeros_like(image)
    d = em.perturbation_curve(score, image, baseline, perfect, 10, "deletion")
    assert d.tolist() == pytest.approx([1.0, 0.5, 0.0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert em.auc(d) == pytest.approx(0.1)  # the curve drops to 0 at 20%: area 0.2 / 2
    assert em.auc(em.perturbation_curve(score, image, baseline, reverse, 10, "deletion")) == pytest.approx(0.9)
    ins = em.perturbation_curve(score, image, baseline, perfect, 10, "insertion")
    assert ins[0] == 0.0 and ins[-1] == 1.0 and em.auc(ins) == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    randoms = [em.auc(em.perturbation_curve(score, image, baseline, rng.permutation(n), 10, "deletion"))
               for _ in range(20)]
    assert 0.4 < np.mean(randoms) < 0.6  # random order: about linear, area 0.5


def test_perturbation_changes_every_channel_and_checks_its_arguments():
    image = np.full((4, 4, 3), 200, np.uint8)
    seen = []
    em.perturbation_curve(lambda x: seen.append(x.copy()) or 0.0, image, np.zeros_like(image), np.arange(16), 2,
                          "deletion")
    assert [int((s == 0).all(axis=2).sum()) for s in seen] == [0, 8, 16]
    assert not ((seen[1] == 0).any(axis=2) & ~(seen[1] == 0).all(axis=2)).any()
    with pytest.raises(ValueError, match="mode"):
        em.perturbation_curve(lambda x: 0.0, image, image, np.arange(16), 2, "erase")
    with pytest.raises(ValueError, match="16 pixel indices"):
        em.perturbation_curve(lambda x: 0.0, image, image, np.arange(15), 2, "deletion")


def test_auc_and_summary():
    assert em.auc([1.0, 1.0, 1.0]) == 1.0
    assert em.auc([0.0, 1.0]) == 0.5
    assert em.summary([1.0, 3.0, float("nan"), 2.0, 10.0]) == {"n": 4, "median": 2.5, "mean": 4.0}
    assert em.summary([]) == {"n": 0, "median": None, "mean": None}
