"""Where a run's events go: one stream, and sinks that subscribe to it.

The loop emits plain dicts (`kind`: banner, step, eval, sample, save, note, summary) and writes nothing
of its own about them: each sink takes what it keeps. `SINKS` lists the sinks every run opens on its main
process, in order; the console (rich / plain / json, `ui.TrainReporter`) is the CLI's `on_event`, called
after them, so it sees what they added to an event (the summary's plot path). A new sink (a tracker) is
one entry in `SINKS`: a factory that takes the run's `SinkContext`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Event = dict[str, Any]
PLOT_HINT = "not drawn: matplotlib is not installed (pip install 'microft[plot]' adds it)"


class Sink(Protocol):
    def __call__(self, e: Event) -> None: ...

    def close(self) -> None: ...


@dataclass
class SinkContext:
    """What a sink may need of its run."""

    out: Path
    log_every: int
    title: str  # the run's name, model and batch plan (the plot's title)
    resume_step: int | None  # a resumed run: records after this step are dropped (-1: all)
    note: Callable[[str], None]  # a note line on the event stream
    failed: Callable[[BaseException, str], BaseException]  # the one-line error for a write that failed
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config and batch plan


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics.jsonl and how many lines were unreadable (a SIGKILL tears the last one)."""
    recs, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(rec)
        else:
            bad += 1
    return recs, bad


class MetricsFile:
    """OUT/metrics.jsonl: a record per logged step (every `--log-every` and the last) and per evaluation.

    A resumed run first rewrites the file (atomically) with the records up to its checkpoint's step, so
    every step appears once; torn lines are dropped with a note."""

    def __init__(self, ctx: SinkContext):
        self.ctx, self.path = ctx, ctx.out / "metrics.jsonl"
        if ctx.resume_step is not None and self.path.exists():
            recs, bad = read_metrics(self.path)
            if bad:
                ctx.note(f"dropped {bad} torn line{'s' if bad > 1 else ''} of {self.path} (a run killed "
                         "while writing)")
            tmp = self.path.with_name(f".tmp-metrics-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in recs if r.get("step", 0) <= ctx.resume_step))
            os.replace(tmp, self.path)

    def __call__(self, e: Event) -> None:
        kind = e.get("kind")
        if kind == "step" and e["step"] % self.ctx.log_every and e["step"] != e["total_steps"]:
            return
        if kind in ("step", "eval"):
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({k: v for k, v in e.items() if k != "kind"}) + "\n")
            except OSError as err:
                raise self.ctx.failed(err, f"metrics.jsonl at step {e['step']}") from None

    def close(self) -> None:
        pass


class SummaryFiles:
    """At the summary: OUT/summary.json, then the learning curve from metrics.jsonl (OUT/learning_curve.png,
    with the `plot` extra); the summary event gets the plot's path, or how to get one."""

    def __init__(self, ctx: SinkContext):
        self.ctx = ctx

    def __call__(self, e: Event) -> None:
        if e.get("kind") != "summary":
            return
        out = self.ctx.out
        try:
            summary = {k: v for k, v in e.items() if k != "kind"}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            plot = plot_curves(out / "metrics.jsonl", out / "learning_curve.png", self.ctx.title)
        except OSError as err:
            raise self.ctx.failed(err, "summary.json") from None
        if plot:
            e["plot"] = str(plot)
        else:
            e["plot_missing"] = PLOT_HINT

    def close(self) -> None:
        pass


SINKS: dict[str, Callable[[SinkContext], Sink]] = {
    "metrics.jsonl": MetricsFile,
    "summary": SummaryFiles,
}


class Fanout:
    """The stream: each event to every sink in order, then to `on_event` (the console)."""

    def __init__(self, sinks: list[Sink], on_event: Callable[[Event], None]):
        self.sinks, self.on_event = sinks, on_event

    def __call__(self, e: Event) -> None:
        for s in self.sinks:
            s(e)
        self.on_event(e)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the smoothed train loss of the plot)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_rewards(ax: Any, recs: list[dict[str, Any]]) -> None:
    """Preference tuning's panel: the reward margin (train per step, val markers) and the reward accuracy."""
    for kind, style, color in (("step", "-", "tab:green"), ("eval", "o--", "tab:red")):
        pts = [(r["step"], r["rewards/margins"], r["rewards/accuracies"]) for r in recs
               if "rewards/margins" in r and ("val_loss" in r) == (kind == "eval")]
        if pts:
            steps, margins, accs = zip(*pts)
            name = "train" if kind == "step" else "val"
            ax.plot(steps, margins, style, color=color, label=f"{name} reward margin")
            ax.plot(steps, accs, style, color=color, alpha=0.4, label=f"{name} reward accuracy")
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rewards/margins, accuracies")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")


def plot_curves(metrics_path: Path, png: Path, title: str | None = None) -> Path | None:
    """Train loss (per step, faint, and smoothed), val loss markers and the lr (right axis) against step,
    titled with the run; when matplotlib (the `plot` extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs, _ = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r and math.isfinite(r["loss"])]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in recs if "lr" in r]
    preference = any("rewards/margins" in r for r in recs)
    fig, axes = plt.subplots(2 if preference else 1, 1, figsize=(8, 7 if preference else 4.5), squeeze=False)
    ax = axes[0][0]
    if tr:
        steps, losses = zip(*tr)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, smoothed(list(losses)), color="tab:blue", label="train (smoothed)")
    if va:
        ax.plot(*zip(*va), "o--", color="tab:orange", label="val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over pairs)" if preference else "loss (token mean)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="tab:gray", linewidth=1, linestyle=":", label="lr")
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title or str(metrics_path.parent))
    if preference:
        plot_rewards(axes[1][0], recs)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
