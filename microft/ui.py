"""Everything the user sees: rich displays on a terminal, plain or JSON lines in logs and CI.

Library modules emit plain event dicts; this module turns them into output. No other module
imports rich.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

Event = dict[str, Any]
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_duration(s: float) -> str:
    s = int(s)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def error(message: str) -> None:
    """One line on stderr; the caller sets the exit code."""
    err.print(f"[bold red]error:[/] {message}" if err.is_terminal else f"error: {message}",
              markup=err.is_terminal)


def stopped(message: str) -> None:
    """One line on stderr for a run the user stopped (Ctrl-C, SIGTERM): not an error, so no `error:`."""
    err.print(f"[bold yellow]{message}[/]" if err.is_terminal else message, markup=err.is_terminal,
              highlight=False)


def resolve_log_format(log_format: str) -> str:
    if log_format in ("auto", None):
        return "rich" if out.is_terminal else "plain"
    return log_format


def _mem(e: Event) -> str:
    if "cuda_max_allocated" in e:
        return f"{fmt_bytes(e['cuda_max_allocated'])} alloc / {fmt_bytes(e['cuda_max_reserved'])} reserved"
    return f"{fmt_bytes(e.get('peak_rss'))} rss"


def rewards(e: Event) -> str:
    """Preference tuning's margin and accuracy (TRL's rewards/margins, rewards/accuracies), or nothing."""
    if "rewards/margins" not in e:
        return ""
    return f"  margin {e['rewards/margins']:+.3f}  acc {e['rewards/accuracies']:.2f}"


def banner_lines(e: Event) -> list[tuple[str, str]]:
    rows = [
        ("model", f"{e['model']}  ({e['params_trainable']:,} trainable / {e['params_total']:,} total "
                  "parameters)"),
        ("device", f"{e['device']}  precision {e['precision']}  grad checkpointing {e['grad_ckpt']}"),
        ("optimizer", f"{e['optimizer']}  lr {e['lr']:g}  schedule {e['schedule']}"),
        ("Effective batch", e["effective_batch"]),
        ("tokens per step", f"{e['tokens_per_step']:,} (at most)"),
        ("steps", f"{e['total_steps']} total, {e['steps_per_epoch']} per epoch; "
                  f"{e['train_samples']} train / {e['val_samples']} val samples"),
        ("output", e["out"]),
    ]
    for key in ("estimated_peak", "demo", "data_stats", "preference"):
        if e.get(key):
            rows.append((key.replace("_", " "), str(e[key])))
    if e.get("resumed_from"):
        rows.append(("resumed", f"from {e['resumed_from']} at step {e['start_step']}"))
    return rows


def summary_lines(e: Event) -> list[tuple[str, str]]:
    rows = [
        ("steps", f"{e['steps']} in {fmt_duration(e['time_s'])}"),
        ("tokens", f"{e['tokens']:,}: {e['train_tokens_per_sec']:,.0f} tokens/s while training (the live "
                   f"figure), {e['tokens_per_sec']:,.0f} tokens/s over the wall time (evaluations and saves "
                   "included)"
         if e.get("train_tokens_per_sec") else f"{e['tokens']:,} ({e['tokens_per_sec']:,.0f} tokens/s)"),
        ("final step loss", f"{e['final_loss']:.4f}" if e.get("final_loss") is not None else "-"),
        ("best val loss",
         f"{e['best_val_loss']:.4f} at step {e['best_step']}" if e.get("best_val_loss") else "-"),
        ("peak memory",
         _mem(e) + (f"; traced {fmt_bytes(e['traced_peak'])}" if e.get("traced_peak") else "")),
        ("MFU", f"{100 * e['mfu']:.1f}% of {e['peak_flops'] / 1e12:.2f} TFLOP/s ({e['peak_flops_source']})"),
        ("verdict", e["verdict"]),
        ("weights", e["final_dir"]),
    ]
    if e.get("skipped_steps"):
        rows.append(("skipped steps", f"{e['skipped_steps']} (fp16 overflow)"))
    if e.get("plot") or e.get("plot_missing"):
        rows.append(("learning curve", e.get("plot") or e["plot_missing"]))
    return rows


def shorten_left(text: str, width: int = 60) -> str:
    """The end of `text` in about `width` characters, cut at a word boundary ('…' marks the cut)."""
    if len(text) <= width:
        return text
    tail = text[-width:]
    mid_word = not text[-width - 1].isspace() and not tail[0].isspace()
    words = tail.split(None, 1) if mid_word else [tail]
    return "…" + (words[-1] if len(words) > 1 else tail).lstrip()


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


class TrainReporter:
    """Renders trainer events: a live progress display (rich), plain lines, or JSON lines."""

    def __init__(self, log_format: str = "auto"):
        self.fmt = resolve_log_format(log_format)
        self.smooth: float | None = None
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, e: Event) -> None:
        if self.fmt == "json":
            print(json.dumps(e, default=str), flush=True)
            return
        kind = e["kind"]
        if kind == "step":
            loss = e["loss"]
            if math.isfinite(loss):
                self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        getattr(self, f"_{kind}", self._other)(e)

    # --- per event kind -------------------------------------------------------------------
    def _banner(self, e: Event) -> None:
        if self.fmt == "rich":
            out.print(kv_table("microft run", banner_lines(e)))
            self.progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=out, transient=False,
            )
            self.task = self.progress.add_task("train", total=e["total_steps"], completed=e["start_step"],
                                               stats="")
            self.progress.start()
        else:
            for k, v in banner_lines(e):
                print(f"{k}: {v}", flush=True)

    def _step(self, e: Event) -> None:
        stats = (f"loss {e['loss']:.4f} (avg {self.smooth or float('nan'):.4f})  lr {e['lr']:.2e}  "
                 f"gnorm {e['grad_norm']:.2f}{rewards(e)}  {e['tokens_per_sec']:,.0f} tok/s  {_mem(e)}")
        if self.progress is not None:
            self.progress.update(self.task, completed=e["step"], stats=stats)
            return
        remaining = (e["total_steps"] - e["step"]) * e["elapsed"] / max(e["step"], 1)
        print(f"step {e['step']}/{e['total_steps']}  {stats}  eta {fmt_duration(remaining)}"
              + ("  (skipped: fp16 overflow)" if e.get("skipped") else ""), flush=True)

    def _eval(self, e: Event) -> None:
        self._print(f"eval  step {e['step']}  val loss {e['val_loss']:.4f}{rewards(e)}")

    def _sample(self, e: Event) -> None:
        self._print(f"sample  step {e['step']}  {shorten_left(e['prompt'])!r} → {e['output']!r}")

    def _save(self, e: Event) -> None:
        if e["what"] != "step" or self.fmt != "rich":
            self._print(f"saved {e['what']} weights at step {e['step']} → {e['path']}")

    def _summary(self, e: Event) -> None:
        self.close()
        if self.fmt == "rich":
            out.print(kv_table("run summary", summary_lines(e)))
        else:
            for k, v in summary_lines(e):
                print(f"{k}: {v}", flush=True)

    def _other(self, e: Event) -> None:
        self._print(e.get("text") or json.dumps(e, default=str))

    def _print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def print_kv(title: str, rows: list[tuple[str, str]], plain: bool | None = None) -> None:
    if plain if plain is not None else not out.is_terminal:
        for k, v in rows:
            print(f"{k}: {v}")
    else:
        out.print(kv_table(title, rows))


def print_table(title: str, columns: list[str], rows: list[list[str]], plain: bool | None = None,
                text: tuple[str, ...] = ()) -> None:
    """A table on a terminal; tab-separated lines otherwise. The first column and those named in `text` are
    left-aligned, numbers right-aligned."""
    if plain if plain is not None else not out.is_terminal:
        print("\t".join(columns))
        for r in rows:
            print("\t".join(r))
        return
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c not in (columns[0], *text) else "left")
    for r in rows:
        t.add_row(*r)
    out.print(t)
