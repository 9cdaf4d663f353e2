"""Flags and messages as a user meets them: every dry-run key is a flag, optimizer flags reach the optimizer,
--no-shuffle keeps file order, a resumed run keeps its lr schedule, errors name the flag as typed, an
interrupt is not an error, and Ctrl-C at any moment of start-up ends with 130 and nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from microft.cli import app
from microft.config import BatchPlan, RunConfig, resolve_config
from microft.data.batches import epoch_batches
from microft.errors import ConfigError, Interrupted
from microft.train.loop import train
from tests.helpers import masked_samples, run_config, sigint_at_step, tiny_model

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def alpaca(path: Path, n: int = 24) -> Path:
    path.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i} {i} {i}"}
                                for i in range(n)]))
    return path


def finetune(tmp_path: Path, *flags: str):
    return invoke("finetune", "--model", "gpt2-tiny", "--data", str(alpaca(tmp_path / "d.json")), "--out",
                  str(tmp_path / "out"), "--max-seq-len", "32", "--template", "plain", "--precision", "fp32",
                  "--device", "cpu", "--log-format", "plain", "--eval-every", "0", *flags)


def command_flags(command: str) -> set[str]:
    """Every flag the command accepts, read from the click command typer builds (what --help lists)."""
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


# --- item 6: every key --dry-run prints is a flag -----------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain", "finetune", "dpo"])
def test_every_key_the_dry_run_prints_is_a_flag_of_that_command(command):
    res = invoke(command, "--dry-run")
    assert res.exit_code == 0, res.output
    keys = json.loads(res.output[: res.output.index("\nEffective batch")])
    for new in ("beta1", "beta2", "eps", "momentum", "eval_batches", "log_every", "shuffle"):
        assert new in keys, new
    flags = command_flags(command)
    missing = [k for k in keys if "--" + k.replace("_", "-") not in flags]
    assert not missing, missing
    shown = invoke(command, "--help").output
    assert all(f"--{k.replace('_', '-')}" in shown for k in ("beta2", "eps", "momentum", "log-every"))


def test_every_run_config_field_is_a_flag_of_some_command():
    flags = command_flags("finetune") | command_flags("pretrain") | command_flags("dpo")
    assert {f for f in RunConfig.model_fields if "--" + f.replace("_", "-") not in flags} == set()


def test_optimizer_flags_reach_the_optimizer_through_the_cli(tmp_path):
    res = finetune(tmp_path, "--global-bs", "4", "--max-steps", "1", "--beta1", "0.8", "--beta2", "0.99",
                   "--eps", "1e-6", "--samples-per-eval", "0", "--eval-batches", "2")
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-0000001" / "train_state.pt",
                       weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.99)} and {g["eps"] for g in groups} == {1e-6}
    assert state["config"]["eval_batches"] == 2 and state["config"]["samples_per_eval"] == 0


def test_momentum_reaches_sgd_and_log_every_thins_the_metrics(tmp_path):
    res = finetune(tmp_path, "--global-bs", "4", "--max-steps", "5", "--optimizer", "sgd", "--momentum",
                   "0.5", "--log-every", "2")
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-0000005" / "train_state.pt",
                       weights_only=False)
    assert {g["momentum"] for g in state["optimizer"]["param_groups"]} == {0.5}
    steps = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [2, 4, 5]  # every 2nd step, and the last


@pytest.mark.parametrize("flags, words", [
    (["--beta2", "0.99", "--optimizer", "sgd"],
     "--beta2 applies to --optimizer adamw and adamw-8bit, not sgd"),
    (["--momentum", "0.5"], "--momentum applies to --optimizer sgd, not adamw"),
    (["--eps", "0"], "--eps 0.0: must be greater than 0"),
])
def test_an_optimizer_flag_the_optimizer_would_ignore_is_refused(flags, words):
    res = invoke("finetune", *flags, "--dry-run")
    assert res.exit_code == 2 and res.output.strip() == f"error: {words}", res.output


# --- item 6: --no-shuffle -------------------------------------------------------------------------------
def test_no_shuffle_takes_the_samples_in_order_whatever_their_lengths():
    lengths = [5, 40, 3, 17, 9, 30, 2, 11, 8, 25, 4]
    for seed, epoch in ((1, 0), (2, 3)):
        assert epoch_batches(11, 3, seed, epoch, lengths, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert epoch_batches(11, 3, 1, 0, lengths) != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_no_shuffle_through_the_cli_gives_steps_of_consecutive_records(tmp_path, monkeypatch, shuffle):
    from microft.train import loop

    seen: list[list[int]] = []
    real = loop.step_batches

    def spy(*args, **kw):
        mbs, idx = real(*args, **kw)
        seen.append(sorted(idx))
        return mbs, idx

    monkeypatch.setattr(loop, "step_batches", spy)
    res = finetune(tmp_path, "--global-bs", "4", "--micro-bs", "2", "--max-steps", "4", "--val-frac", "0",
                   *([] if shuffle else ["--no-shuffle"]))
    assert res.exit_code == 0, res.output
    in_order = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert (seen == in_order) is not shuffle, seen


# --- item 6: extending a finished run keeps its schedule ----------------------------------------------
def _lrs(events: list[dict]) -> list[float]:
    return [e["lr"] for e in events if e["kind"] == "step"]


def test_extending_a_finished_run_keeps_its_schedule_and_says_so(tmp_path):
    samples = masked_samples(32)
    plan = BatchPlan(micro_bs=2, accum=2)
    first: list[dict] = []
    cfg = run_config(tmp_path, max_steps=6, lr=1e-2, min_lr_ratio=0.1)
    train(tiny_model(), samples, None, cfg, plan, first.append)
    final_lr = 1e-2 * 0.1
    events: list[dict] = []
    extend = cfg.model_copy(update={"resume": "auto", "max_steps": 10, "lr": 5e-2})
    train(tiny_model(), samples, None, extend, plan, events.append)
    assert [e["step"] for e in events if e["kind"] == "step"] == [7, 8, 9, 10]
    assert _lrs(events) == pytest.approx([final_lr] * 4)  # not a re-stretched cosine: no jump up
    assert max(_lrs(events)) <= min(_lrs(first))
    notes = [e["text"] for e in events if e["kind"] == "note" and "schedule" in e["text"]]
    assert len(notes) == 1 and "cosine over 6 steps" in notes[0], notes
    assert f"steps 7-10 run at its final lr {final_lr:.3g}" in notes[0], notes
    assert "--lr given now not applied" in notes[0] and f"--model {tmp_path}/final" in notes[0], notes
    banner = next(e for e in events if e["kind"] == "banner")
    assert banner["schedule"].startswith("cosine over 6 steps")


def test_a_checkpoint_without_its_schedule_says_which_one_the_lr_follows(tmp_path):
    """Checkpoints written before schedules were recorded: the lr follows the new run length, said in
    a line."""
    samples, plan = masked_samples(32), BatchPlan(micro_bs=2, accum=2)
    cfg = run_config(tmp_path, max_steps=4)
    train(tiny_model(), samples, None, cfg, plan)
    path = tmp_path / "checkpoints" / "step-0000004" / "train_state.pt"
    state = torch.load(path, weights_only=False)
    del state["schedule"]
    torch.save(state, path)
    events: list[dict] = []
    train(tiny_model(), samples, None, cfg.model_copy(update={"resume": "auto", "max_steps": 8}), plan,
          events.append)
    notes = [e["text"] for e in events if e["kind"] == "note" and "schedule" in e["text"]]
    assert len(notes) == 1
    assert "does not record its lr schedule" in notes[0] and "cosine over 8 steps" in notes[0]


def test_a_resume_with_the_same_flags_says_nothing_of_the_schedule(tmp_path):
    samples = masked_samples(32)
    plan = BatchPlan(micro_bs=2, accum=2)
    cfg = run_config(tmp_path, max_steps=6, save_every=3)

    with pytest.raises(Interrupted):
        train(tiny_model(), samples, None, cfg, plan, sigint_at_step(3))
    events: list[dict] = []
    train(tiny_model(), samples, None, cfg.model_copy(update={"resume": "auto"}), plan, events.append)
    assert not [e for e in events if e["kind"] == "note" and "schedule" in e["text"]]


# --- item 7: messages in the user's words -------------------------------------------------------------
@pytest.mark.parametrize("flags, line", [
    (["--micro-bs", "0"], "error: --micro-bs must be positive or 'auto', got 0"),
    (["--accum", "0"], "error: --accum must be positive, got 0"),
    (["--precision", "bf16"],
     "error: --precision bf16: choose auto, fp32, bf16-mixed, fp16-mixed or bf16-true; "
     "did you mean bf16-mixed?"),
    (["--optimizer", "adam8bit"], "error: --optimizer adam8bit: choose adamw, sgd, adafactor or adamw-8bit; "
                                  "did you mean adamw-8bit?"),
    (["--log-format", "xml"], "error: --log-format xml: choose auto, rich, plain or json"),
    (["--val-frac", "1.5"], "error: --val-frac 1.5: must be less than 1"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
])
def test_flag_errors_name_the_flag_as_typed_on_one_line(flags, line):
    res = invoke("finetune", *flags, "--dry-run")
    assert res.exit_code == 2 and res.output.strip() == line, res.output


@pytest.mark.parametrize("argv, words", [
    (["finetune", "--accum", "abc"], ["--accum: must be a valid integer", "(see microft finetune --help)"]),
    (["finetune", "--bta2", "0.9"], ["--bta2", "--beta2", "(see microft finetune --help)"]),
    (["generate"], ["--model", "(see microft generate --help)"]),
])
def test_a_flag_the_parser_refuses_is_one_line_too(monkeypatch, capsys, argv, words):
    """What typer/click refuse before a command runs (a value of the wrong type, an unknown or missing option)
    is one line naming the flag, as every user error, not typer's boxed panel."""
    from microft.cli import main

    monkeypatch.setattr(sys, "argv", ["microft", *argv])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        signal.signal(signal.SIGINT, handler)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(w in lines[0] for w in words), lines


def test_recipe_errors_name_the_recipe_and_its_key(tmp_path):
    recipe = tmp_path / "r.toml"
    for text, message in [
        ('precision = "bf16"\n', rf"^recipe {recipe}: precision = 'bf16': choose .*bf16-mixed\?"),
        ("lora_rank = 8\n", "unknown key 'lora_rank' \\(did you mean 'lora_r'\\?\\)"),
        ('micro_bs = "x"\n', r"micro_bs = 'x': must be a positive integer or 'auto'$"),
        ("micro_bs = 0\n", "^--micro-bs must be positive"),
    ]:
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve_config(str(recipe))
    recipe.write_text("shuffle = false\nbeta2 = 0.98\n")  # the new keys are recipe keys too
    assert resolve_config(str(recipe)).shuffle is False and resolve_config(str(recipe)).beta2 == 0.98


def test_estimate_mem_names_seq_len_as_typed():
    res = invoke("estimate-mem", "--model", "gpt2-tiny", "--seq-len", "0")
    assert res.exit_code == 2 and res.output.strip() == "error: --seq-len must be positive, got 0", res.output


def test_an_interrupt_is_reported_as_what_happened_not_as_an_error(monkeypatch):
    import microft.runs

    def stopped(cfg, on_event):
        raise Interrupted("interrupted at step 93; saved runs/x/checkpoints/step-0000093. Resume with: "
                          "microft finetune --resume auto", 130)

    monkeypatch.setattr(microft.runs, "run_finetune", stopped)
    res = invoke("finetune", "--max-steps", "1")
    assert res.exit_code == 130
    assert res.output.startswith("interrupted at step 93; saved ") and "error" not in res.output


def test_switches_show_no_value_and_each_command_has_its_own_help():
    ft = invoke("finetune", "--help").output
    assert "<bool>" not in ft and "--dry-run" in ft and "--no-shuffle" in ft
    assert "mps" in ft and "<str>" in ft  # options that take a value still show it
    pre = invoke("pretrain", "--help").output
    assert "demo" not in pre and ".txt" in pre
    assert "demo" in ft


def test_a_run_without_matplotlib_says_how_to_get_the_plot(tmp_path, monkeypatch):
    from microft.ui import summary_lines

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    events: list[dict] = []
    train(tiny_model(), masked_samples(16), None, run_config(tmp_path, max_steps=2),
          BatchPlan(micro_bs=2, accum=1), events.append)
    summary = events[-1]
    assert not (tmp_path / "learning_curve.png").exists()
    rows = dict(summary_lines(summary))
    assert "pip install 'microft[plot]'" in rows["learning curve"]
    assert sum("microft[plot]" in json.dumps(e) for e in events) == 1  # said once


# --- item 9: Ctrl-C at any moment of start-up ---------------------------------------------------------
def test_an_interrupt_that_c_code_swallowed_still_stops_the_run_with_nothing_written(tmp_path, monkeypatch):
    """torch's numpy bridge clears the KeyboardInterrupt of an interrupted `import numpy` and goes on; the run
    must still stop (130, `--out` never created), and what the half-import breaks is no traceback."""
    import microft.errors
    import microft.runs

    monkeypatch.setattr(microft.errors, "_SIGNALS", {})
    real = microft.runs.load_base

    def swallowed(cfg, run, then_fail: bool):
        try:
            microft.errors.record_signal(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass  # what C code does with it
        if then_fail:
            raise AttributeError("module 'numpy' has no attribute 'void'")
        return real(cfg, run)

    for then_fail in (False, True):
        monkeypatch.setattr(microft.errors, "_SIGNALS", {})
        monkeypatch.setattr(microft.runs, "load_base", lambda cfg, run, f=then_fail: swallowed(cfg, run, f))
        res = finetune(tmp_path, "--global-bs", "4", "--max-steps", "2")
        assert res.exit_code == 130, res.output
        assert "Traceback" not in res.output and "interrupted" in res.output.splitlines()[-1]
        assert not (tmp_path / "out").exists()


def test_a_signal_during_an_import_waits_for_the_import_to_finish(tmp_path):
    """Ctrl-C inside a module's import (where torch's C++ start-up would abort on the KeyboardInterrupt:
    exit -6) is held until the import is done, then raised in the code after it."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "t = time.perf_counter()\n"
        "while time.perf_counter() - t < 0.3:\n"
        "    pass\n"
        "print('import finished', flush=True)\n")
    script = ("import signal, sys, time\n"
              "from microft.errors import record_signal, signal_received\n"
              "signal.signal(signal.SIGINT, record_signal)\n"
              "try:\n"
              "    import slow_module\n"
              "    print('after import', flush=True)\n"
              "    time.sleep(2)\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted after the import', 'slow_module' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    expected = ["import finished", "after import", "interrupted after the import True"]
    assert res.stdout.splitlines() == expected, (res.stdout, res.stderr)
    # code that sees the recorded signal first acts on it: the deferred one is not sent again (it would
    # land as a second KeyboardInterrupt in the middle of the clean-up)
    acting = script.replace("    print('after import'", "    assert signal_received() == signal.SIGINT\n"
                                                         "    print('after import'")
    res = subprocess.run([sys.executable, "-c", acting], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.splitlines() == ["import finished", "after import"], (
        res.stdout, res.stderr)


def test_sigint_at_any_moment_of_start_up_exits_130_and_writes_nothing(tmp_path):
    """A real `python -m microft finetune`, interrupted at several moments of its start-up (imports, model
    and data loading, the banner): exit 130, `interrupted …` on stderr and no traceback, `--out` never
    created."""
    data = alpaca(tmp_path / "d.json", 200)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Python's own start-up (the site module) runs before any code of ours can handle a signal: begin after it
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import microft.errors"], check=True, env=env, cwd=ROOT)
    first = max(0.1, 2 * (time.perf_counter() - t))
    for delay in (first, first + 0.15, 0.6, 1.0, 1.5, 2.5):
        out = tmp_path / f"out-{delay}"
        cmd = [sys.executable, "-m", "microft", "finetune", "--model", "gpt2-tiny", "--data", str(data),
               "--out", str(out), "--max-steps", "100000", "--log-format", "plain"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, (delay, stderr)
        # (torch may warn "Failed to initialize NumPy" when the signal cut numpy's import short)
        assert "Traceback" not in stderr and "error:" not in stderr, (delay, stderr)
        assert stderr.strip().splitlines()[-1].startswith("interrupted"), (delay, stderr)
        if "step 1/" not in stdout:  # interrupted before step 1
            assert not out.exists(), (delay, os.listdir(out))
