"""Nothing lost, nothing cryptic: the --out lock, earlier runs, start-up interrupts, pruning under a kill,
torn metrics, read-only and full disks, non-finite options and losses, unreadable data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from microft.config import resolve_config
from microft.errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError
from microft.train import checkpoint
from microft.train.checkpoint import find_latest_checkpoint, list_checkpoints, prune_checkpoints
from microft.train.loop import train
from microft.train.outdir import LOCK, owned_out, release_lock, take_lock, tidy
from tests.helpers import masked_samples, run_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, out: Path, events: list | None = None, **kw):
    from microft.config import BatchPlan

    cfg = run_config(out, **{"max_steps": 4, "save_every": 1, "keep_last": 2, **kw})
    return train(tiny_model(), masked_samples(16), None, cfg, BatchPlan(micro_bs=2, accum=1),
                 (events if events is not None else []).append)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


# --- the lock --------------------------------------------------------------------------------------------
def test_lock_holds_pid_host_and_time_refuses_a_live_owner_and_is_released(tmp_path):
    notes: list[str] = []
    lock = take_lock(tmp_path, notes.append)
    info = json.loads(lock.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    with pytest.raises(ConfigError, match=rf"in use by another microft run \(pid {os.getpid()} on "):
        take_lock(tmp_path, notes.append)  # this process is alive: refused
    release_lock(lock)
    assert not lock.exists() and not notes


def test_a_live_owner_from_another_process_is_refused_by_owned_out(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                 "started": "t"}))
        with pytest.raises(ConfigError, match=f"pid {sleeper.pid}"), \
                owned_out(run_config(tmp_path), lambda e: None):
            pass
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == sleeper.pid  # not taken from its owner
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_processs_lock_is_reclaimed_with_a_note_and_released_after(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                             "started": "t"}))
    events: list[dict] = []
    with owned_out(run_config(tmp_path), events.append):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert any("reclaimed the lock" in e["text"] for e in events)
    assert not (tmp_path / LOCK).exists()


def test_a_second_cli_run_into_a_busy_out_is_refused_naming_the_owner(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from microft.train.outdir import owned_out; from "
         "tests.helpers import run_config\nwith owned_out(run_config(sys.argv[1]), print):\n print('held', "
         "flush=True); time.sleep(60)", str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, env=env,
         cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "microft", "finetune", "--model", "gpt2-tiny", "--out",
                               str(tmp_path / "out"), "--data", str(tmp_path / "x.jsonl")],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and f"pid {holder.pid}" in proc.stderr
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()
    assert not (tmp_path / "out").exists()  # the holder's start-up was interrupted: it leaves nothing


# --- earlier runs and start-up --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run.json", "metrics.jsonl", "checkpoints", "final"])
def test_an_out_holding_any_earlier_run_is_refused_unless_resume(tmp_path, name):
    (tmp_path / name).mkdir() if name in ("checkpoints", "final") else (tmp_path / name).write_text("{}\n")
    with pytest.raises(ConfigError, match=f"already holds a run.*{name}.*--resume auto"), \
            owned_out(run_config(tmp_path), lambda e: None):
        pass
    assert (tmp_path / name).exists() and not (tmp_path / LOCK).exists()
    with owned_out(run_config(tmp_path, resume="auto"), lambda e: None):
        pass


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_step_1_exits_130_or_143_and_leaves_no_half_made_out(tmp_path, sig, code):
    out = tmp_path / "new" / "out"
    with pytest.raises(Interrupted) as e, owned_out(run_config(out), lambda e: None):
        (out / "run.json").write_text("{}")
        os.kill(os.getpid(), sig)
    assert e.value.exit_code == code and "before step 1" in str(e.value)
    assert not (tmp_path / "new").exists()
    # an existing directory keeps what it held, and only that
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(Interrupted), owned_out(run_config(tmp_path), lambda e: None):
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


@pytest.mark.parametrize("case", ["file", "under-file"])
def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path, case):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if case == "file" else tmp_path / "f" / "sub"
    with pytest.raises(ConfigError, match="is a file"), owned_out(run_config(out), lambda e: None):
        pass


def test_a_read_only_mount_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "size=1m,ro"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(ConfigError, match="Read-only file system"), \
                owned_out(run_config(ro / "x"), print):
            pass
        with pytest.raises(ConfigError, match="Read-only file system"), owned_out(run_config(ro), print):
            pass
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# --- checkpoints and metrics after a SIGKILL -------------------------------------------------------------
def test_prune_killed_mid_way_never_leaves_a_torn_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, tmp_path, keep_last=3)
    steps = list_checkpoints(tmp_path)
    assert [p.name for p in steps] == ["step-0000002", "step-0000003", "step-0000004"]

    def killed(path, ignore_errors=False):  # SIGKILL after the first file went
        next(Path(path).iterdir()).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        prune_checkpoints(tmp_path, 1)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == steps[1:]  # the half-deleted one is out of the way, not listed
    (tmp_path / "checkpoints" / "step-0000001").mkdir()  # an older run's torn directory
    notes: list[str] = []
    tidy(tmp_path, notes.append)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000003", "step-0000004"]
    assert len(notes) == 2 and find_latest_checkpoint(tmp_path) == steps[-1]


def test_tidy_restores_a_directory_moved_aside_by_a_killed_save(tmp_path):
    (tmp_path / f".old-final-{_dead_pid()}").mkdir()
    (tmp_path / ".tmp-final-1").mkdir()
    notes: list[str] = []
    tidy(tmp_path, notes.append)
    assert sorted(os.listdir(tmp_path)) == ["final"] and "restored" in notes[0]


def test_resume_after_a_torn_metrics_line_drops_it_with_a_note(tmp_path):
    _train(tmp_path, tmp_path, max_steps=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    events: list[dict] = []
    _train(tmp_path, tmp_path, events, max_steps=5, resume="auto")
    assert any("torn line" in e.get("text", "") for e in events)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_auto_without_a_checkpoint_starts_metrics_afresh(tmp_path):
    # a run stopped before its first save
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    _train(tmp_path, tmp_path, max_steps=2, resume="auto")
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# --- full disks ------------------------------------------------------------------------------------------
def test_disk_full_while_saving_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = checkpoint.save_train_state
    calls = []

    def fill(directory, state):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(directory, state)

    monkeypatch.setattr(checkpoint, "save_train_state", fill)
    with pytest.raises(TrainingError, match=r"disk full while saving step 3; the last good checkpoint is "
                                            r".*step-0000002"):
        _train(tmp_path, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_real_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=600k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(TrainingError, match="disk full while saving") as e:
            _train(tmp_path, disk / "out", max_steps=20)
        assert e.value.exit_code == 1
        last = find_latest_checkpoint(disk / "out")
        assert last is not None and f"the last good checkpoint is {last}" in str(e.value)
        checkpoint.load_train_state(last)  # it loads
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --- non-finite values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    ({"lr": float("nan")}, "--lr nan: must be a finite number"),
    ({"lr": float("inf")}, "--lr inf: must be a finite number"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"epochs": float("nan")}, "--epochs nan: must be a finite number"),
    ({"epochs": 0.0}, "--epochs must be positive"),
    ({"epochs": -1.0}, "--epochs must be positive"),
    ({"dropout": 1.5}, "--dropout 1.5: must be less than 1"),
    ({"dropout": -0.1}, "--dropout -0.1: must be greater than or equal to 0"),
    ({"weight_decay": float("inf")}, "--weight-decay inf: must be a finite number"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm"),
    ({"beta2": 1.0}, "--beta2 1.0: must be less than 1"),
])
def test_non_finite_and_out_of_range_options_are_refused_up_front(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, **flags)


def test_fp16_scaler_skipping_every_step_stops_with_exit_1_and_no_final(tmp_path):
    with pytest.raises(TrainingError,
                       match=r"skipped 3 steps in a row \(steps \d+-\d+; loss nan, scale ") as e:
        _train(tmp_path, tmp_path, precision="fp16-mixed", lr=1e30, max_steps=8, save_every=0)
    assert e.value.exit_code == 1 and not (tmp_path / "final").exists()


# --- inputs ----------------------------------------------------------------------------------------------
def test_data_and_model_inputs_that_used_to_raise_tracebacks(tmp_path, monkeypatch):
    from microft.data.instruct import read_records
    from microft.memory.estimate import load_shape, parse_budget
    from microft.models.load import read_model_config

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_records(deep)
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(DataError, match="symbolic links"):
        read_records(tmp_path / "loop1")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        read_model_config(tmp_path / "m")
    with pytest.raises(CheckpointError, match="must be a JSON object"):  # the same reader as finetune
        load_shape(str(tmp_path / "m" / "config.json"))
    for bare in ("1.5", "18"):
        with pytest.raises(ConfigError, match=f"give a unit: {bare}GB or {bare}GiB"):
            parse_budget(bare)
    assert parse_budget("18GiB").bytes == 18 * 2**30
    (tmp_path / "d").mkdir()

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)  # root reads a chmod 000 directory anyway
    with pytest.raises(DataError, match="Permission denied"):
        read_records(tmp_path / "d")


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "f").write_text("x")
    for args in (["finetune", "--out", str(tmp_path / "f"), "--lr", "1e-3", "--data", str(tmp_path / "f")],
                 ["finetune", "--lr", "nan", "--data", str(tmp_path / "f")],
                 ["estimate-mem", "--model", "gpt2-tiny", "--gpu-mem", "1.5"]):
        proc = subprocess.run([sys.executable, "-m", "microft", *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


# --- resuming into a changed run, and what --resume auto may replace ---------------------------------------
@pytest.mark.parametrize("change", [dict(optimizer="sgd"), dict(precision="bf16-true")])
def test_resume_with_another_optimizer_or_precision_is_one_line(tmp_path, change):
    """The checkpoint's optimizer state fits only its own optimizer (and precision: bf16-true keeps master
    bits, fp16 a loss scale): a changed flag is refused by name, the checkpoint untouched."""
    _train(tmp_path, tmp_path, max_steps=2)
    ckpt = find_latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    flag, value = next(iter(change.items()))
    with pytest.raises(CheckpointError, match=f"it was trained with --{flag} .*, now {value}"):
        _train(tmp_path, tmp_path, max_steps=4, resume="auto", **change)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    _train(tmp_path, tmp_path, max_steps=3, resume="auto", precision="bf16-mixed")  # fp32's state fits it


def test_resume_auto_never_replaces_final_weights_it_cannot_continue(tmp_path):
    """--resume auto with no complete checkpoint starts over only where nothing would be replaced: a run's
    final (or best) weights without a checkpoint are refused, and stay as they were."""
    _train(tmp_path, tmp_path, max_steps=2)
    for p in list_checkpoints(tmp_path):
        (p / checkpoint.TRAIN_STATE).unlink()  # torn: not a checkpoint any more
    final = (tmp_path / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="final weights but no complete checkpoint"):
        _train(tmp_path, tmp_path, max_steps=3, resume="auto")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == final


# --- export and merge: their --out --------------------------------------------------------------------------
def test_export_and_merge_refuse_an_out_they_cannot_write_in_one_line(tmp_path):
    from microft.train.outdir import check_written_dir, writing

    (tmp_path / "f").write_text("precious")
    with pytest.raises(ConfigError, match="is a file"):
        check_written_dir(tmp_path / "f", force=True)
    with pytest.raises(ConfigError, match="lies under .*which is a file"):
        check_written_dir(tmp_path / "f" / "sub", force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        check_written_dir(tmp_path / "full", force=False)
    check_written_dir(tmp_path / "full", force=True)
    with pytest.raises(ConfigError, match="cannot write --out .*: Permission denied"), \
            writing(tmp_path / "ro"):
        raise PermissionError(13, "Permission denied")
    assert (tmp_path / "f").read_text() == "precious"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "adapter").mkdir()
    # --out is checked before anything is read
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    for cmd in ("export", "merge"):
        for out in (tmp_path / "f", tmp_path / "f" / "sub"):
            model = str(tmp_path / "adapter")
            proc = subprocess.run([sys.executable, "-m", "microft", cmd, "--model", model, "--out", str(out)],
                                  capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith("error: --out ") and proc.stderr.count("\n") == 1, proc.stderr
    assert (tmp_path / "f").read_text() == "precious"
