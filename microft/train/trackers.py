"""Experiment trackers (`--report-to`): more sinks on the run's event stream, each an optional extra.

A tracker is one entry in `TRACKERS`: the package it needs, the extra that installs it, and a backend
class (built with the saved `ref` of a resumed run, or the hyper-parameters of a new one) with four calls
(`metrics`, `summary`, `image`, `close`) and a `ref`, what it takes to find its run again. `TrackerSink` turns
events into those calls and keeps the rules every tracker shares:

- hyper-parameters: the resolved config, batch plan and precision, flattened (`config.lr`, `plan.accum`), sent
  once when the tracker's run is new;
- per logged step (the `--log-every` cadence of metrics.jsonl) loss, lr, grad norm, tokens/s, step time and
  memory as `train/...`; per evaluation its numbers (`eval/val_loss`); at the end the summary's numbers as
  `summary/...` and learning_curve.png where the tracker keeps images;
- what a tracker prints goes to stderr (stdout is the console's: `--log-format json`);
- OUT/trackers.json records each tracker's run and the last step it was sent, so a resumed run continues the
  same tracker run and sends each step once (steps between the checkpoint and the crash are not sent again:
  the resumed run recomputes the same values); a tracker new to a resumed run is first sent metrics.jsonl's
  steps;
- a tracker that fails (server down, disk full, package broken) costs one note line and is switched off;
  training goes on, and metrics.jsonl stays the record.

Trackers run where the sinks run: on the main process only (rank 0 under torchrun).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microft.errors import ConfigError, one_line
from microft.train.sinks import Event, SinkContext, read_metrics

LEDGER = "trackers.json"
# the step record's fields that are not metrics
NOT_METRICS = {"kind", "step", "total_steps", "skipped"}


@dataclass(frozen=True)
class Tracker:
    module: str  # what `--report-to` imports; checked before the model loads
    extra: str  # pip install 'microft[extra]'
    # (ctx, the saved ref of a resumed run or None, the flattened hyper-parameters of a new run or None)
    open: Callable[[SinkContext, dict[str, Any] | None, dict[str, Any] | None], Any]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"config": {"lr": 1e-3}} as {"config.lr": 1e-3}; lists and None as text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def numbers(e: Event, skip: set[str] = NOT_METRICS) -> dict[str, float]:
    """The finite numeric fields of an event (booleans and text left out)."""
    return {k: float(v) for k, v in e.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def run_name(ctx: SinkContext) -> str:
    """`--run-name`, else the output directory's name."""
    return ctx.config.get("config", {}).get("run_name") or ctx.out.resolve().name


def experiment(ctx: SinkContext) -> str:
    """`--experiment`, else "microft"."""
    return ctx.config.get("config", {}).get("experiment") or "microft"


def report_dir(ctx: SinkContext) -> Path:
    """`--report-dir`, else OUT/tensorboard: TensorBoard's log directory."""
    given = ctx.config.get("config", {}).get("report_dir")
    return Path(given) if given else ctx.out / "tensorboard"


class TensorBoard:
    """Event files under OUT/tensorboard/ (or --report-dir), written by torch.utils.tensorboard."""

    def __init__(self, ctx: SinkContext, saved: dict[str, Any] | None, params: dict[str, Any] | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(saved["log_dir"]) if saved else report_dir(ctx).resolve()
        self.writer = SummaryWriter(str(self.dir))
        self.ref = {"log_dir": str(self.dir)}
        if params:  # TensorBoard's text tab renders markdown
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def summary(self, values: dict[str, float], step: int) -> None:
        self.metrics(values, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        data = png.read_bytes()
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # PNG's IHDR
        img = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class MLflow:
    """A run in MLFLOW_TRACKING_URI, else in a file store at OUT/mlruns (mlflow-skinny has no SQLite store;
    MLflow 3 opens a file store only with MLFLOW_ALLOW_FILE_STORE=true, set for this process when unset)."""

    def __init__(self, ctx: SinkContext, saved: dict[str, Any] | None, params: dict[str, Any] | None):
        # a resumed run stays in the store its run is in, whatever MLFLOW_TRACKING_URI says now
        uri = ((saved or {}).get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
               or (ctx.out / "mlruns").resolve().as_uri())
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # a server that is down costs seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = experiment(ctx)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_name(ctx)).info.run_id
        self.ref = {"uri": uri, "run_id": self.run_id}
        if params:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, values: dict[str, float], step: int) -> None:
        self.metrics(values, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class WandB:
    """A W&B run: project WANDB_PROJECT (else --experiment, else "microft"), named --run-name; files under
    WANDB_DIR, else OUT/wandb; WANDB_MODE=offline keeps it there until `wandb sync`."""

    def __init__(self, ctx: SinkContext, saved: dict[str, Any] | None, params: dict[str, Any] | None):
        import wandb

        project = os.environ.get("WANDB_PROJECT") or experiment(ctx)
        where = Path(os.environ.get("WANDB_DIR") or ctx.out / "wandb")
        where.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name(ctx), dir=str(where),
                              id=(saved or {}).get("id"), resume="allow" if saved else None, config=params)
        self.ref = {"id": self.run.id, "project": project}

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def image(self, tag: str, png: Path, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(png))}, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Trackio:
    """A Trackio run in its own local store (its default: ~/.cache/huggingface/trackio, TRACKIO_DIR), project
    --experiment (else "microft"), named --run-name; `trackio show` opens the dashboard."""

    def __init__(self, ctx: SinkContext, saved: dict[str, Any] | None, params: dict[str, Any] | None):
        import trackio

        self.trackio = trackio
        project, name = (saved["project"], saved["name"]) if saved else (experiment(ctx), run_name(ctx))
        # no dashboard launched, no system sampler threads: the run's own numbers only
        self.run = trackio.init(project=project, name=name, config=params,
                                resume="allow" if saved else "never", embed=False, auto_log_gpu=False,
                                auto_log_cpu=False)
        self.ref = {"project": project, "name": name}

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, png: Path, step: int) -> None:
        self.run.log({tag: self.trackio.Image(str(png))}, step=step)

    def close(self, finished: bool) -> None:
        current = getattr(getattr(self.trackio, "context_vars", None), "current_run", None)
        if current is not None and current.get() is self.run:
            self.trackio.finish()  # also forgets the run, so trackio's exit hook doesn't finish it again
        else:
            self.run.finish()


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", "tensorboard", TensorBoard),
    "mlflow": Tracker("mlflow", "mlflow", MLflow),
    "wandb": Tracker("wandb", "wandb", WandB),
    "trackio": Tracker("trackio", "trackio", Trackio),
}


def quiet_stdout() -> contextlib.AbstractContextManager:
    """What a tracker prints goes to stderr: stdout is the console's (`--log-format json` is one event a
    line there)."""
    return contextlib.redirect_stdout(sys.stderr)


def check_trackers(names: list[str]) -> None:
    """Refuse, in one line, a tracker microft doesn't know or whose package is not installed (before the
    model loads)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name}: choose from {', '.join(TRACKERS)} (comma-separated)")
        t = TRACKERS[name]
        if importlib.util.find_spec(t.module) is None:
            raise ConfigError(f"--report-to {name} needs the {t.module} package: "
                              f"pip install 'microft[{t.extra}]'")


class Ledger:
    """OUT/trackers.json: each tracker's run (its `ref`) and the last step and evaluation it was sent."""

    def __init__(self, out: Path, resuming: bool):
        self.path = out / LEDGER
        self.entries: dict[str, dict[str, Any]] = {}
        if resuming and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):  # unreadable: the trackers start new runs
                self.entries = {}

    def save(self) -> None:
        tmp = self.path.with_name(f".tmp-trackers-{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, indent=2))
        os.replace(tmp, self.path)


class TrackerSink:
    """One tracker on the event stream: what it is sent and when; a failure contained (one note, then off)."""

    def __init__(self, name: str, ctx: SinkContext, ledger: Ledger):
        self.name, self.ctx, self.ledger = name, ctx, ledger
        self.backend: Any = None
        self.finished = False
        saved = ledger.entries.get(name)
        self.entry = {"ref": None, "step": 0, "eval": -1, **(saved or {})}
        try:
            with quiet_stdout():
                self.backend = TRACKERS[name].open(ctx, saved["ref"] if saved else None,
                                                   None if saved else flatten(ctx.config))
            self.entry["ref"] = self.backend.ref
            if saved is None and ctx.resume_step:  # a tracker new to a resumed run: the steps before it too
                with quiet_stdout():
                    self.backfill()
            ledger.entries[name] = self.entry
            ledger.save()
            where = ", ".join(f"{k} {v}" for k, v in self.backend.ref.items())
            ctx.note(f"--report-to {name}: {'continuing' if saved else 'new'} run ({where})")
        except Exception as e:  # a tracker never stops the run
            self.fail(e)

    def backfill(self) -> None:
        """Send what metrics.jsonl holds (up to the checkpoint's step: MetricsFile has cut it there)."""
        path = self.ctx.out / "metrics.jsonl"
        for r in read_metrics(path)[0] if path.is_file() else []:
            kind = "eval" if "val_loss" in r else "step" if "loss" in r else None
            if kind is not None:
                self.backend.metrics({f"{'train' if kind == 'step' else kind}/{k}": v
                                      for k, v in numbers(r).items()}, r["step"])
                self.entry[kind] = r["step"]

    def fail(self, e: BaseException) -> None:
        self.ctx.note(f"--report-to {self.name} failed ({one_line(e, 160)}); reporting to {self.name} is off "
                      f"for the rest of this run, training goes on (metrics.jsonl has every step)")
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.close(False)
            except Exception:  # already failing: the one note is said
                pass

    def __call__(self, e: Event) -> None:
        if self.backend is None:
            return
        try:
            with quiet_stdout():
                self.send(e)
        except Exception as err:
            self.fail(err)

    def send(self, e: Event) -> None:
        kind, b = e.get("kind"), self.backend
        if kind == "step":
            step = e["step"]
            due = step % self.ctx.log_every == 0 or step == e["total_steps"]
            if not due or step <= self.entry["step"]:  # sent before the run was resumed
                return
            b.metrics({f"train/{k}": v for k, v in numbers(e).items()}, step)
            self.entry["step"] = step
        elif kind == "eval":
            if e["step"] <= self.entry["eval"]:
                return
            b.metrics({f"eval/{k}": v for k, v in numbers(e).items()}, e["step"])  # val_loss, and any other
            self.entry["eval"] = e["step"]
        elif kind == "summary":
            b.summary({f"summary/{k}": v for k, v in numbers(e, {"kind"}).items()}, e["steps"])
            if e.get("plot"):
                b.image("learning_curve", Path(e["plot"]), e["steps"])
            self.finished = True
        else:
            return
        self.ledger.save()

    def close(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                with quiet_stdout():
                    backend.close(self.finished)
            except Exception as e:
                self.ctx.note(f"--report-to {self.name}: closing its run failed ({one_line(e, 160)})")


def open_trackers(ctx: SinkContext, names: list[str]) -> list[TrackerSink]:
    """A sink per `--report-to` name, sharing the run's OUT/trackers.json (continued when resuming)."""
    if not names:
        return []
    ledger = Ledger(ctx.out, resuming=ctx.resume_step is not None)
    return [TrackerSink(n, ctx, ledger) for n in names]
