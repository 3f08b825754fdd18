"""The open-set rule: FAR curves per face resolution, the threshold for a gallery of N people."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from app.match import Matcher
from app.openset import OpenSet, face_px
from trainer.calibrate import far_curve, fit_far_curves, pair_far, threshold_for
from trainer.evaluate import open_set_identification

pytestmark = pytest.mark.unit


def _calibration(sd_native: float = 0.1, sd_16: float = 0.07) -> dict:
    rng = np.random.default_rng(0)
    return {"curves": [
        {"face_px": 112, **far_curve(rng.normal(0, sd_native, 4_000_000))},
        {"face_px": 16, **far_curve(rng.normal(0, sd_16, 4_000_000))},
    ]}


def test_far_curve_measures_the_tail_and_extends_it() -> None:
    curve = far_curve(np.random.default_rng(1).normal(0.0, 0.1, 4_000_000))
    lf, t = np.array(curve["log10_far"]), np.array(curve["threshold"])
    for far in (1e-2, 1e-3):  # measured: the normal's quantile
        assert t[np.isclose(lf, np.log10(far))][0] == pytest.approx(norm.isf(far, 0, 0.1), abs=3e-3)
    assert curve["measured_to"] == -3.25  # 2,000 pairs above at 10^-3.25 of 4 million
    assert np.all(np.diff(t) > 0)  # lower FAR, higher threshold, past the data too
    # the straight extension of a bending (Gaussian) tail asks more than the true quantile,
    # never less, and not absurdly more
    for far in (1e-5, 1e-7):
        true = norm.isf(far, 0, 0.1)
        assert true < t[np.isclose(lf, np.log10(far))][0] < true + 0.08
    with pytest.raises(ValueError, match="too few"):
        far_curve(np.zeros(100_000))


def test_the_threshold_rises_with_the_gallery_and_follows_resolution() -> None:
    cal = _calibration()
    assert pair_far(0.001, 1) == pytest.approx(0.001)
    assert pair_far(0.001, 1000) == pytest.approx(1e-6, rel=1e-3)
    t = [threshold_for(cal, 1e-3, n) for n in (1, 10, 100, 1000, 10_000)]
    assert np.all(np.diff(t) > 0)
    assert t[0] == pytest.approx(norm.isf(1e-3, 0, 0.1), abs=5e-3)
    # N = 100: pair FAR 1e-5, past the measured tail: the extension asks a little more
    assert norm.isf(1e-5, 0, 0.1) < t[2] < norm.isf(1e-5, 0, 0.1) + 0.04
    # a 16 px probe's impostors spread less here, so it needs less; 64 px lies between
    low, mid, high = (threshold_for(cal, 1e-3, 100, px) for px in (16, 64, None))
    assert low < mid < high
    assert threshold_for(cal, 1e-3, 100, 8) == low  # below the calibrated range: clamped
    assert threshold_for(cal, 1e-3, 100, 300) == high


def test_matcher_names_a_stranger_less_often_as_the_gallery_grows() -> None:
    """A fixed pair threshold gives a stranger one chance per enrolled person; the calibrated
    rule raises the bar with the number of people, so strangers stay unknown."""
    rng = np.random.default_rng(3)
    d = 64
    sd = 1 / np.sqrt(d)  # cosines of random unit vectors in 64-d
    # cosines of random unit vectors in d dimensions: (cos + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)
    cosines = 2 * rng.beta((d - 1) / 2, (d - 1) / 2, 4_000_000) - 1
    cal = {"curves": [{"face_px": 112, **far_curve(cosines)}]}
    gallery = _unit(rng.normal(size=(1000, d)))
    names = [f"p{i}" for i in range(1000)]
    strangers = _unit(rng.normal(size=(1000, d)))
    fixed = Matcher(names, gallery, norm.isf(1e-3, 0, sd))
    rule = Matcher(names, gallery, OpenSet(calibration=cal, rate=1e-3))
    named_fixed = sum(m.identity is not None for m in fixed.match_many(strangers))
    named_rule = sum(m.identity is not None for m in rule.match_many(strangers))
    assert named_fixed > 300  # most strangers named against 1,000 people (~50-63% expected)
    assert named_rule <= 8  # about 1 expected at 1e-3 per probe
    assert rule.threshold > fixed.threshold
    # and one enrolled person's own photo still matches
    assert rule.match(gallery[7] + 0.3 * strangers[0]).identity == "p7"


def test_face_px_from_eye_distance() -> None:
    # the ArcFace 112 template has 35.2 px between the eyes
    assert face_px(35.24) == pytest.approx(112, abs=0.2)
    assert face_px(5.03) == pytest.approx(16, abs=0.1)


def test_fixed_rule_and_calibration_need_one_or_the_other() -> None:
    assert OpenSet(fixed=0.4).threshold(5000, 16) == 0.4
    with pytest.raises(ValueError):
        OpenSet()


def test_open_set_identification_counts_like_frvt() -> None:
    gallery = np.eye(4, dtype=np.float32)
    mated = np.array([[0.9, 0.1, 0, 0], [0.2, 0.6, 0, 0], [0, 0, 0.3, 0.5]], np.float32)
    mated_ids = np.array([0, 1, 2])  # the third is ranked wrong (3 beats 2)
    nonmated = np.array([[0.5, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 0.2, 0]] * 10, np.float32)
    r = open_set_identification(gallery, mated, mated_ids, nonmated)
    assert r["rank1"] == pytest.approx(66.67)
    # FPIR 1%: no non-mated probe may reach t (0 of 30 allowed): t just above 0.5
    assert r["threshold_at_fpir_0.01"] == pytest.approx(0.5)
    assert r["fnir_at_fpir_0.01"] == pytest.approx(33.33)  # 0.9 and 0.6 named, 1 of 3 missed


def test_the_margin_rule_names_a_face_that_stands_out_and_not_a_close_call() -> None:
    """Below the gallery-size threshold, a face scoring at least the one-pair threshold that
    leads the second-best person by the calibrated margin is named; a close call is not."""
    rule = OpenSet(calibration=_calibration(), rate=1e-3)
    n, d = 200, 512
    rng = np.random.default_rng(9)
    gallery = _unit(rng.normal(size=(n, d)))  # nearly orthogonal people
    matcher = Matcher([f"p{i}" for i in range(n)], gallery, rule)
    floor, lead, t = rule.floor, rule.margin(n), matcher.threshold
    assert floor < 0.42 < t and 0.0 < lead < 0.35, (floor, lead, t)
    noise = _unit(rng.normal(size=(2, d)))
    # p0 at 0.42, everyone else near 0: stands out, named though below the threshold
    alone = 0.42 * gallery[0] + np.sqrt(1 - 0.42**2) * noise[0]
    m = matcher.match(alone)
    assert m.identity == "p0" and floor <= m.score < t
    # p0 and p1 both at 0.42: a close call, the look of a stranger's best of many
    both = 0.42 * gallery[0] + 0.42 * gallery[1] + np.sqrt(1 - 2 * 0.42**2) * noise[1]
    m = matcher.match(both)
    assert m.identity is None and m.candidate in ("p0", "p1")
    # a fixed threshold has no margin rule
    assert Matcher([f"p{i}" for i in range(n)], gallery, 0.5).match(alone).identity is None


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_fit_far_curves_orders_resolutions_and_refuses_too_little() -> None:
    rng = np.random.default_rng(5)
    g = _unit(rng.normal(size=(2000, 32)))
    ids = np.arange(2000) % 400
    cal = fit_far_curves(g, ids, {None: g, 16: _unit(g + rng.normal(size=g.shape))}, ids)
    assert [c["face_px"] for c in cal["curves"]] == [112, 16]
    assert cal["identities"] == 400 and cal["curves"][0]["pairs"] > 3_000_000
    with pytest.raises(ValueError, match="too few"):
        fit_far_curves(g[:100], ids[:100], {None: g[:100]}, ids[:100])
