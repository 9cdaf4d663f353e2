"""`--report-to`: the trackers read back, with their own readers, what metrics.jsonl holds; a resumed run
continues the same tracker run with each step once; a failing tracker costs one note, never the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import microft.runs
from microft.cli import app
from microft.config import BatchPlan
from microft.train import trackers
from microft.train.loop import train
from tests.helpers import masked_samples, run_config, tiny_model

runner = CliRunner()


def _train(tmp_path: Path, report_to: list[str], steps: int = 4, events: list | None = None, **kw):
    cfg = run_config(tmp_path, max_steps=steps, eval_every=2, report_to=report_to, run_name="t", **kw)
    return train(tiny_model(), masked_samples(12, seed=1, max_len=12), masked_samples(4, seed=2, max_len=12),
                 cfg, BatchPlan(micro_bs=1, accum=2), (events if events is not None else []).append)


def _failures(events: list[dict]) -> list[str]:
    return [e["text"] for e in events if e["kind"] == "note" and e["text"].startswith("--report-to")
            and " failed (" in e["text"]]


def _jsonl_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _tb_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_reads_the_losses_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    events: list[dict] = []
    _train(tmp_path, ["tensorboard"], events=events)
    assert not _failures(events)
    losses = _tb_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert dict(losses) == pytest.approx(_jsonl_losses(tmp_path), rel=1e-6)  # float32 in event files
    assert [s for s, _ in _tb_scalars(tmp_path / "tensorboard", "eval/val_loss")] == [0, 2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/lr", "train/grad_norm", "train/tokens_per_sec", "train/peak_rss"} <= set(tags["scalars"])
    assert "summary/final_loss" in tags["scalars"]
    if (tmp_path / "learning_curve.png").exists():  # the plot extra: the curve is an image in TensorBoard
        assert tags["images"] == ["learning_curve"]


def test_mlflow_client_reads_back_params_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _train(tmp_path, ["mlflow"], experiment="exp1", log_every=2)
    ledger = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    from mlflow.tracking import MlflowClient

    assert ledger["ref"]["uri"].startswith("file:") and (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=ledger["ref"]["uri"])
    run = client.get_run(ledger["ref"]["run_id"])
    assert run.info.run_name == "t" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp1"
    assert run.data.params["config.lr"] == "0.01" and run.data.params["plan.accum"] == "2"
    assert run.data.params["precision"] == "fp32"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    jsonl = _jsonl_losses(tmp_path)
    assert {m.step: m.value for m in history} == pytest.approx(jsonl)
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [2, 4]  # --log-every 2
    assert "summary/final_loss" in run.data.metrics


def test_wandb_offline_writes_a_run_directory(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "microft-test")
    events: list[dict] = []
    _train(tmp_path, ["wandb"], events=events)
    assert not _failures(events), events
    ref = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["ref"]
    runs = list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{ref['id']}"))
    assert ref["project"] == "microft-test" and len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's record, for `wandb sync`
    assert capfd.readouterr().out == ""  # W&B's lines go to stderr: stdout is the console's
    _train(tmp_path, ["wandb"], steps=6, events=events, resume="auto")  # resumed: the same W&B run id
    assert not _failures(events)
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == {"ref": ref, "step": 6, "eval": 6}


TRACKIO_RUN = """
import json, sys
from pathlib import Path
from tests.test_trackers import _failures, _train
out = Path(sys.argv[1])
events = []
_train(out, ["trackio"], experiment="proj", events=events, save_every=2)
import shutil
for d in ("final", "checkpoints/step-0000004"):  # stopped after reporting step 4, its checkpoint lost
    shutil.rmtree(out / d)
_train(out, ["trackio"], experiment="proj", events=events, save_every=2, steps=6, resume="auto")
assert not _failures(events), events
from trackio.sqlite_storage import SQLiteStorage
print("LOGS", json.dumps([(log["step"], log["train/loss"]) for log in SQLiteStorage.get_logs("proj", "t")
                          if "train/loss" in log]))
"""


def test_trackio_logs_locally_and_a_resumed_run_continues_it(tmp_path):
    pytest.importorskip("trackio")
    import subprocess
    import sys

    # trackio reads TRACKIO_DIR when imported: a process of its own keeps it off the user's store
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(tmp_path / "o")], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (line,) = res.stdout.splitlines()  # what trackio prints went to stderr: stdout is the console's
    logged = json.loads(line.removeprefix("LOGS "))
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]  # each step once, in one run
    assert dict(logged) == pytest.approx(_jsonl_losses(tmp_path / "o"))
    assert (tmp_path / "trackio" / "proj.db").is_file()


def test_a_resumed_run_continues_the_tracker_run_with_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _train(tmp_path, ["tensorboard", "mlflow"], steps=4, save_every=2)
    first = json.loads((tmp_path / "trackers.json").read_text())
    # killed after step 4 was reported but with its last step checkpoint at 2: steps 3-4 are recomputed
    import shutil

    for d in ("final", "checkpoints/step-0000004"):
        shutil.rmtree(tmp_path / d, ignore_errors=True)
    events: list[dict] = []
    _train(tmp_path, ["tensorboard", "mlflow"], steps=6, save_every=2, resume="auto", events=events)
    said = [e["text"] for e in events if e["kind"] == "note" and e["text"].startswith("--report-to")]
    assert said == [f"--report-to tensorboard: continuing run (log_dir {tmp_path / 'tensorboard'})",
                    f"--report-to mlflow: continuing run (uri {first['mlflow']['ref']['uri']}, "
                    f"run_id {first['mlflow']['ref']['run_id']})"]
    again = json.loads((tmp_path / "trackers.json").read_text())
    assert again["mlflow"]["ref"] == first["mlflow"]["ref"] and again["mlflow"]["step"] == 6
    tb = _tb_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=first["mlflow"]["ref"]["uri"])
    history = client.get_metric_history(first["mlflow"]["ref"]["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert dict(tb) == pytest.approx(_jsonl_losses(tmp_path), rel=1e-6)  # recomputed steps: the same numbers


class Broken:
    """A tracker whose package fails once the run is under way (a disk full, a server gone)."""

    def __init__(self, ctx, saved, params):
        self.ref, self.calls = {}, 0

    def metrics(self, values, step):
        self.calls += 1
        if step == 2:
            raise OSError(28, "No space left on device")

    def summary(self, values, step):
        raise AssertionError("a failed tracker is sent nothing more")

    def image(self, tag, png, step):
        raise AssertionError("a failed tracker is sent nothing more")

    def close(self, finished):
        pass


def test_a_failing_tracker_leaves_the_run_finishing_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "broken", trackers.Tracker("os", "none", Broken))

    def cannot_start(ctx, saved, params):
        raise ConnectionError("tracking server at http://127.0.0.1:9 refused the connection")

    monkeypatch.setitem(trackers.TRACKERS, "down", trackers.Tracker("os", "none", cannot_start))
    events: list[dict] = []
    summary = _train(tmp_path, ["broken", "down"], events=events)
    notes = sorted(_failures(events))
    assert len(notes) == 2, notes  # one each: the broken one is not called again after its failure
    assert "--report-to broken failed" in notes[0] and "No space left" in notes[0]
    assert "--report-to down failed" in notes[1] and "training goes on" in notes[1]
    assert summary["steps"] == 4 and sorted(_jsonl_losses(tmp_path)) == [1, 2, 3, 4]


def test_a_missing_tracker_package_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(microft.runs, "load_base", lambda *a, **k: calls.append("load"))
    monkeypatch.setitem(trackers.TRACKERS, "absent", trackers.Tracker("no_such_module_xyz", "absent", Broken))
    for flag, message in (("absent", "--report-to absent needs the no_such_module_xyz package: "
                                     "pip install 'microft[absent]'"),
                          ("neptune", "--report-to neptune: choose from tensorboard, mlflow, wandb, trackio, "
                                      "absent (comma-separated)")):
        for cmd in ("finetune", "pretrain"):
            res = runner.invoke(app, [cmd, "--model", "gpt2-tiny", "--data", str(tmp_path / "d.jsonl"),
                                      "--out", str(tmp_path / "o"), "--report-to", flag])
            assert res.exit_code == 2 and res.output.strip() == f"error: {message}", res.output
            assert len(res.output.strip().splitlines()) == 1
    assert calls == [] and not (tmp_path / "o").exists()


def test_report_to_in_a_recipe_and_as_flags(tmp_path):
    from microft.config import resolve_config

    r = tmp_path / "r.toml"
    r.write_text('report_to = ["tensorboard", "mlflow"]\nrun_name = "a"\nexperiment = "b"\n')
    cfg = resolve_config(str(r))
    assert (cfg.report_to, cfg.run_name, cfg.experiment) == (["tensorboard", "mlflow"], "a", "b")
    assert resolve_config(str(r), report_to="wandb").report_to == ["wandb"]
    assert resolve_config(None, report_to="TensorBoard, mlflow,").report_to == ["tensorboard", "mlflow"]
    assert resolve_config(None, report_to="none").report_to == []


def test_flatten_names_nested_params():
    nested = {"config": {"lr": 0.1, "columns": None, "report_to": ["a"]}, "plan": {"accum": 2}}
    flat = trackers.flatten(nested)
    assert flat == {"config.lr": 0.1, "config.columns": "null", "config.report_to": '["a"]', "plan.accum": 2}


def test_pretrain_reports_through_the_cli(tmp_path):
    pytest.importorskip("tensorboard")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    out, board = tmp_path / "o", tmp_path / "board"
    res = runner.invoke(app, ["pretrain", "--data", str(text), "--model", "gpt2-tiny", "--out", str(out),
                              "--max-steps", "3", "--max-seq-len", "32", "--micro-bs", "2", "--accum", "1",
                              "--report-to", "tensorboard", "--report-dir", str(board),
                              "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    assert [s for s, _ in _tb_scalars(board, "train/loss")] == [1, 2, 3]
    assert not (out / "tensorboard").exists()


def test_only_the_main_process_reports(tmp_path):
    from types import SimpleNamespace

    from microft.train.loop import open_stream

    cfg = run_config(tmp_path, report_to=["tensorboard"])
    worker = SimpleNamespace(dist=SimpleNamespace(is_main=False), cfg=cfg, out=tmp_path)
    assert open_stream(worker, lambda e: None, None).sinks == []  # no sink, no tracker on rank > 0
    assert not (tmp_path / "trackers.json").exists()


def test_an_mlflow_server_that_is_down_costs_one_note(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    events: list[dict] = []
    summary = _train(tmp_path, ["mlflow"], events=events)
    notes = _failures(events)
    assert len(notes) == 1 and notes[0].startswith("--report-to mlflow failed ("), notes
    assert summary["steps"] == 4 and sorted(_jsonl_losses(tmp_path)) == [1, 2, 3, 4]


def test_a_tracker_new_to_a_resumed_run_gets_the_steps_before_it(tmp_path):
    pytest.importorskip("tensorboard")
    _train(tmp_path, [], steps=4, save_every=2, log_every=2)
    import shutil

    for d in ("final", "checkpoints/step-0000004"):
        shutil.rmtree(tmp_path / d)
    events: list[dict] = []
    _train(tmp_path, ["tensorboard"], steps=6, save_every=2, log_every=2, resume="auto", events=events)
    assert not _failures(events)
    # 2 from metrics.jsonl
    assert [s for s, _ in _tb_scalars(tmp_path / "tensorboard", "train/loss")] == [2, 4, 6]
    assert [s for s, _ in _tb_scalars(tmp_path / "tensorboard", "eval/val_loss")] == [0, 2, 4, 6]
