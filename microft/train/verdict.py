"""The one-line fit verdict of a run's summary, read from its validation curve.

It says only what the evaluations support: a curve of a handful of steps or evaluations is too short to
judge; a val loss that stays near chance (ln of the vocabulary: a uniform guess) or never falls below its
start has learned nothing, whatever its shape; otherwise the curve's last half tells a loss still falling
(underfitting) from one that has flattened (well fit), and a rise from the best one, overfitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MIN_EVALS = 4  # the start and three more: fewer points cannot show a trend
MIN_STEPS = 10  # a handful of optimizer steps (warm-up included) says nothing about fit
NEAR_CHANCE = 0.05  # a val loss within this fraction of ln(vocab) has learned next to nothing
MIN_DROP = 0.01  # a best val loss less than this fraction below the start's: no measurable improvement
OVERFIT_RISE = 0.02  # a last val loss this fraction above the best: overfitting
STILL_FALLING = 0.1  # the last half's fitted drop above this fraction of the whole drop: still falling


def verdict(history: Sequence[dict[str, Any]], vocab_size: int) -> str:
    """One line read from the evaluations in `history` (records with `step` and `val_loss`), compared to the
    loss at the start and to chance, ln(vocab_size)."""
    evals = [h for h in history if "val_loss" in h and math.isfinite(h["val_loss"])]
    if len(evals) < 2:
        return "not enough evaluations for a verdict (set --eval-every)"
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    best = min(evals, key=lambda h: h["val_loss"])
    curve = f"val loss {first:.3f} → {last:.3f}"
    steps = evals[-1]["step"] - evals[0]["step"]
    if len(evals) < MIN_EVALS or steps < MIN_STEPS:
        return (f"too short to judge: {len(evals)} evaluations over {steps} steps ({curve}); a trend needs "
                f"{MIN_EVALS}+ over {MIN_STEPS}+ steps (train longer or lower --eval-every)")
    chance = math.log(max(vocab_size, 2))
    if last >= (1 - NEAR_CHANCE) * chance:
        gap = (chance - last) / chance
        where = f"{100 * gap:.1f}% below" if gap > 0 else f"{100 * -gap:.1f}% above"
        return (f"not learning: {curve}, {where} chance (ln {vocab_size} = {chance:.2f}); "
                "raise --lr, train longer or check the data")
    if best["val_loss"] > first * (1 - MIN_DROP):
        return (f"not learning: {curve}, its best ({best['val_loss']:.3f}) not {100 * MIN_DROP:.0f}% "
                "below the start; raise --lr or check the data")
    if best is not evals[-1] and last > best["val_loss"] * (1 + OVERFIT_RISE):
        return (f"overfitting from step {best['step']} (val loss {best['val_loss']:.3f} → {last:.3f}; "
                "best weights kept)")
    window = evals[-max(3, math.ceil(len(evals) / 2)):]
    if _fitted_drop(window) > STILL_FALLING * (first - best["val_loss"]):
        return f"underfitting: {curve}, still falling at the end; train longer or raise --lr"
    return f"well fit: {curve}, flat over the last {len(window)} evaluations"


def _fitted_drop(evals: Sequence[dict[str, Any]]) -> float:
    """How much the least-squares line through these evaluations falls from the first one's step to the last's
    (one noisy point moves it less than a difference of two would)."""
    xs = [float(h["step"]) for h in evals]
    ys = [h["val_loss"] for h in evals]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return -slope * (xs[-1] - xs[0])
