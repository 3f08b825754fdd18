"""Open-set calibration: how often a stranger's face scores above a threshold, per face resolution.

A gallery of N people gives a stranger N chances: the best of N impostor scores decides. With
`far(t)` the share of impostor pairs (one probe, one enrolled photo of another person) scoring
at least t, a stranger's probe is named with probability about 1 - (1 - far(t))^N. So the
threshold that keeps the false-alarm rate per probe at `rate` for a gallery of N people is the
one whose pair FAR is 1 - (1 - rate)^(1/N) (about rate / N). Scores of a low-resolution probe
against a sharp enrolled photo are distributed differently from two sharp photos, so the FAR
curve is measured per probe resolution (the probe's face at the resolution of an NxN ArcFace
crop; native = the photo as it is).

`fit_far_curves` measures those curves on embeddings of training-side identities (never LFW
evaluation identities); the result is stored in the model's manifest under "calibration" and
read by `app.openset`. The curve is measured where at least `MIN_TAIL_PAIRS` pairs lie above
the threshold, and extended below that along the straight line (threshold against log10 FAR)
of its last measured decade. Why not measure further: the extreme tail of a web-collected
set is label noise, one person under two labels (CelebA and LFW share celebrities): on 23.4M
pairs SFace's sharp-probe curve jumped from 0.445 at FAR 1e-4 to 0.638 at 1e-5, where 234
pairs decide, while the 16 px probes (whose duplicates no longer look alike) went on smoothly
(0.424 -> 0.481). A straight extension of a tail that bends (a Gaussian-like tail grows ever
slower in log FAR) errs on the safe side: it asks a little more than the true tail would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GRID = np.round(np.arange(-1.0, -9.01, -0.25), 2)  # log10 FAR from 1e-1 to 1e-9
MIN_TAIL_PAIRS = 2000  # a FAR is measured when at least this many pairs lie above its threshold
NATIVE_PX = 112  # the face resolution that stands for "native" (a full ArcFace crop)


def impostor_scores(
    probes: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray,
    chunk: int = 1024,
) -> np.ndarray:
    """Cosine scores of every (probe, gallery photo) pair of two different identities
    (unit rows; float32, unsorted)."""
    out = []
    for i in range(0, len(probes), chunk):
        s = probes[i:i + chunk] @ gallery.T
        out.append(s[probe_ids[i:i + chunk, None] != gallery_ids[None, :]])
    return np.concatenate(out).astype(np.float32)


def far_curve(scores: np.ndarray) -> dict[str, Any]:
    """Threshold per log10 FAR on `GRID` for one set of impostor scores."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]  # descending
    n = len(s)
    measured: list[float] = []
    for lf in GRID:
        above = int(np.floor(10.0 ** lf * n))  # pairs allowed at or above the threshold
        if above < MIN_TAIL_PAIRS:
            break
        measured.append(float(s[above]))
    if len(measured) < 5:
        raise ValueError(f"{n} impostor pairs are too few to calibrate (need "
                         f"{MIN_TAIL_PAIRS * 1000:,} or more)")
    return {**extend(measured), "pairs": int(n)}


def extend(measured: list[float]) -> dict[str, Any]:
    """Thresholds on the whole `GRID` from those measured on its first points, continued
    along the last measured decade (4 grid steps)."""
    k = len(measured)
    slope = (measured[-1] - measured[-5]) / (GRID[k - 1] - GRID[k - 5])
    thresholds = measured + [measured[-1] + slope * (lf - GRID[k - 1]) for lf in GRID[k:]]
    return {
        "log10_far": [float(v) for v in GRID],
        "threshold": [round(min(t, 1.0), 5) for t in thresholds],
        "measured_to": float(GRID[k - 1]),
    }


def fit_far_curves(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    probes: dict[int | None, np.ndarray],
    probe_ids: np.ndarray,
) -> dict[str, Any]:
    """FAR curves per probe resolution. `gallery`: unit embeddings of sharp photos;
    `probes[res]`: unit embeddings of the probe photos with their faces at `res` px (None:
    native), the same photos in the same order for every res; ids: identity labels."""
    curves = []
    for res, emb in sorted(probes.items(), key=lambda kv: kv[0] or NATIVE_PX, reverse=True):
        curve = far_curve(impostor_scores(emb, probe_ids, gallery, gallery_ids))
        curves.append({"face_px": int(res or NATIVE_PX), **curve})
    return {
        "method": "impostor FAR per probe resolution; threshold for a gallery of N at a "
                  "per-probe false-alarm rate r: FAR = 1 - (1 - r)^(1/N)",
        "identities": int(len(np.unique(gallery_ids))),
        "gallery_photos": int(len(gallery)),
        "probe_photos": int(len(probe_ids)),
        "curves": curves,
    }


def pair_far(rate: float, identities: int) -> float:
    """The pair FAR that gives a false-alarm `rate` per probe against `identities` people."""
    n = max(int(identities), 1)
    return float(-np.expm1(np.log1p(-rate) / n))


def threshold_for(calibration: dict[str, Any], rate: float, identities: int,
                  face_px: float | None = None) -> float:
    """The threshold for a probe with its face at `face_px` (None: native) against a gallery
    of `identities` people, for a false-alarm `rate` per probe."""
    lf = float(np.log10(pair_far(rate, identities)))
    x, y = GRID[::-1], _thresholds_at(calibration, face_px)[::-1]  # ascending for np.interp
    if lf < x[0]:  # past the grid: continue the last step's slope
        return min(float(y[0] + (y[1] - y[0]) / (x[1] - x[0]) * (lf - x[0])), 1.0)
    return min(float(np.interp(lf, x, y)), 1.0)


def _thresholds_at(calibration: dict[str, Any], face_px: float | None) -> np.ndarray:
    """The curve's thresholds on `GRID` for this face resolution (None: native): linear
    between the calibrated resolutions, clamped to their range."""
    curves = sorted(calibration["curves"], key=lambda c: c["face_px"])
    pxs = [c["face_px"] for c in curves]
    px = float(NATIVE_PX if face_px is None else min(max(face_px, pxs[0]), pxs[-1]))
    table = np.array([c["threshold"] for c in curves])  # [resolutions, GRID]
    return np.array([np.interp(px, pxs, table[:, i]) for i in range(len(GRID))])


def _survival(calibration: dict[str, Any], face_px: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds ascending, FAR at each) of the curve for this face resolution."""
    t = _thresholds_at(calibration, face_px)
    keep = np.concatenate([[True], np.diff(t) > 1e-6]) & (t < 1.0)  # strictly increasing
    return t[keep], 10.0 ** GRID[keep]


def stranger_margin_rate(calibration: dict[str, Any], identities: int, floor: float,
                         margin: float, face_px: float | None = None) -> float:
    """The share of strangers that a gallery of `identities` people names by the margin rule:
    best score >= `floor` and ahead of the second-best person by >= `margin`. With the N
    impostor scores independent draws of the calibrated FAR curve S (density f = -S'):
    P = N * integral over x >= floor of f(x) (1 - S(x - margin))^(N - 1) dx. Below the curve's
    grid (FAR > 0.1) S is taken as 0.1, which can only overstate P."""
    n = max(int(identities), 1)
    t, far = _survival(calibration, face_px)
    x = np.linspace(floor, 1.0, 600)
    log_s = np.interp(x, t, np.log10(far), right=-12.0)  # FAR at x (the grid's first is 0.1)
    s = 10.0 ** log_s
    density = -np.gradient(s, x)
    below = 10.0 ** np.interp(x - margin, t, np.log10(far), left=-1.0, right=-12.0)
    return float(n * np.trapezoid(np.clip(density, 0, None) * (1.0 - below) ** (n - 1), x))


def margin_for(calibration: dict[str, Any], rate: float, identities: int, floor: float,
               face_px: float | None = None) -> float:
    """The smallest lead over the second-best person (to 0.005) for which the margin rule
    names strangers at most at `rate` (inf when even a lead of 0.6 does not). Bisection: the
    rate falls as the margin grows."""
    if identities < 2:
        return float("inf")

    def ok(m: float) -> bool:
        return stranger_margin_rate(calibration, identities, floor, m, face_px) <= rate

    lo, hi = 0.0, 0.6
    if not ok(hi):
        return float("inf")
    if ok(lo):
        return 0.0
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return round(hi, 3)
