"""Face verification and identification metrics (pure maths on embeddings; no I/O but plots)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Pair:
    left: str  # "Name/Name_0001.jpg" relative to the LFW image root
    right: str
    same: bool
    fold: int


def read_lfw_pairs(path: str | Path) -> list[Pair]:
    """The official LFW View-2 pairs file: a `folds\\tper_fold` header, 2*per_fold lines a fold."""
    lines = Path(path).read_text().splitlines()
    folds, per = (int(v) for v in lines[0].split())
    pairs = []
    for n, line in enumerate(lines[1:]):
        f = line.split()
        fold = n // (2 * per)
        if len(f) == 3:
            pairs.append(Pair(_lfw_name(f[0], f[1]), _lfw_name(f[0], f[2]), True, fold))
        elif len(f) == 4:
            pairs.append(Pair(_lfw_name(f[0], f[1]), _lfw_name(f[2], f[3]), False, fold))
        else:
            raise ValueError(f"{path}:{n + 2}: not a pair line")
    if len(pairs) != folds * 2 * per:
        raise ValueError(f"{path}: expected {folds * 2 * per} pairs, found {len(pairs)}")
    return pairs


def _lfw_name(name: str, index: str) -> str:
    return f"{name}/{name}_{int(index):04d}.jpg"


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold maximising accuracy on (scores, same); candidates: midpoints of sorted scores."""
    s = np.sort(scores)
    cands = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    # accuracy(t) = (#same with score >= t + #diff with score < t) / n, vectorised by sorting
    pos = np.sort(scores[same])
    neg = np.sort(scores[~same])
    acc = (len(pos) - np.searchsorted(pos, cands, "left")) + np.searchsorted(neg, cands, "left")
    return float(cands[int(np.argmax(acc))])


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """LFW protocol: per fold, fit the threshold on the other folds, test on it; (mean, std) %."""
    accs = []
    for k in np.unique(folds):
        test = folds == k
        t = best_threshold(scores[~test], same[~test])
        accs.append(np.mean((scores[test] >= t) == same[test]))
    accs = np.array(accs) * 100
    return float(accs.mean()), float(accs.std())


def roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds), thresholds descending."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    keep = np.r_[np.diff(s) != 0, True]
    return fp[keep] / max(1, (~y).sum()), tp[keep] / max(1, y.sum()), s[keep]


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """Highest true-accept rate whose false-accept rate is <= `far` (in %)."""
    fars, tars, _ = roc(scores, same)
    ok = fars <= far
    return float(tars[ok].max() * 100) if ok.any() else 0.0


def threshold_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The lowest threshold whose false-accept rate on (scores, same) is <= `far`."""
    neg = np.sort(scores[~same])[::-1]
    allowed = int(np.floor(far * len(neg)))  # negatives that may score at or above the threshold
    return float(np.nextafter(neg[allowed], np.inf)) if allowed < len(neg) else float(neg[-1])


def verification_report(
    scores: np.ndarray, same: np.ndarray, folds: np.ndarray
) -> dict[str, float]:
    acc, std = kfold_accuracy(scores, same, folds)
    return {
        "accuracy": round(acc, 2),
        "std": round(std, 2),
        "tar_at_far_1e-3": round(tar_at_far(scores, same, 1e-3), 2),
        "pairs": int(len(scores)),
    }


def rank_n_identification(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    probes: np.ndarray,
    probe_ids: np.ndarray,
    ranks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Closed-set rank-N: the probe's identity is among the N best-scoring identities (%)."""
    ids = np.unique(gallery_ids)
    sim = probes @ gallery.T
    per_id = np.stack([sim[:, gallery_ids == i].max(1) for i in ids], 1)
    order = ids[np.argsort(-per_id, 1)]
    return {
        f"rank{r}": round(float(np.mean((order[:, :r] == probe_ids[:, None]).any(1)) * 100), 2)
        for r in ranks
    }


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path) -> Path:
    """ROC curves (log FAR axis) for several probe resolutions into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, (far, tar) in curves.items():
        ax.plot(np.maximum(far, 1e-4), tar * 100, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def open_set_identification(
    gallery: np.ndarray,
    mated: np.ndarray,
    mated_ids: np.ndarray,
    nonmated: np.ndarray,
    fpirs: tuple[float, ...] = (0.01, 0.001),
) -> dict[str, float]:
    """1:N open-set identification (NIST FRVT 1:N terms). `gallery`: one unit row per person
    (row i = identity i); `mated`: probes of enrolled people (`mated_ids`); `nonmated`: probes
    of people not enrolled. FPIR(t): share of non-mated probes whose best score reaches t;
    FNIR(t): share of mated probes not named correctly at t (wrong best identity, or below t).
    Reports FNIR at the thresholds where FPIR is each of `fpirs` (read off the non-mated
    scores) and rank-1 accuracy."""
    m_scores = mated @ gallery.T
    m_best = m_scores.argmax(1)
    m_top = m_scores[np.arange(len(mated)), m_best]
    right = m_best == mated_ids
    n_top = (nonmated @ gallery.T).max(1)
    out: dict[str, float] = {"rank1": round(float(right.mean() * 100), 2)}

    def fnir(t: float) -> float:
        return float(np.mean(~(right & (m_top >= t))) * 100)

    desc = np.sort(n_top)[::-1]
    for f in fpirs:
        k = int(np.floor(f * len(desc)))  # non-mated probes allowed at or above t
        t = float(np.nextafter(desc[k], np.inf)) if k < len(desc) else float(desc[-1])
        out[f"fnir_at_fpir_{f:g}"] = round(fnir(t), 2)
        out[f"threshold_at_fpir_{f:g}"] = round(t, 4)
    return out
