"""The CLI end to end on CPU: pretrain → checkpoint → generate, errors, crash safety."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microft.cli import app

runner = CliRunner()
MICROFT = [sys.executable, "-m", "microft.cli"]


def write_corpus(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the king and queen walk to a castle by the sea where birds sing at night".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(n_lines)))
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_is_fast_and_lists_every_command():
    t = time.perf_counter()
    out = subprocess.run([*MICROFT, "--help"], capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t < 5  # generous on a loaded CI box; ~0.3 s idle
    for cmd in ("pretrain", "finetune", "dpo", "generate", "estimate-mem", "export", "merge", "download"):
        assert cmd in out
    for cmd in ("pretrain", "finetune", "dpo", "generate", "estimate-mem", "export", "merge", "download"):
        assert invoke(cmd, "--help").exit_code == 0, cmd


def test_pretrain_then_generate_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "a" / "b" / "run"
    res = invoke("pretrain", "--data", str(corpus), "--model", "gpt2-tiny", "--out", str(out),
                 "--max-seq-len", "32", "--micro-bs", "4", "--accum", "2", "--max-steps", "6",
                 "--eval-every", "3", "--lr", "3e-3", "--log-format", "plain", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    assert "Effective batch: 8 = 4 (micro) × 2 (accum) × 1 (device)" in res.output
    assert (out / "final" / "model.safetensors").exists()
    res = invoke("generate", "--model", str(out / "final"), "--prompt", "the king", "--max-new-tokens", "8",
                 "--temperature", "0", "--json")
    assert res.exit_code == 0, res.output
    from microft.generate import generate_text
    from microft.models.load import load_model

    # what the library generates greedily from that checkpoint
    completion = json.loads(res.output)["completion"]
    assert completion == generate_text(load_model(out / "final"), "the king", 8, temperature=0.0)
    # continue training from the checkpoint as a new run
    res = invoke("pretrain", "--data", str(corpus), "--model", str(out / "final"),
                 "--out", str(tmp_path / "c"), "--max-seq-len", "32", "--micro-bs", "4", "--max-steps", "2",
                 "--log-format", "plain")
    assert res.exit_code == 0, res.output


def test_json_log_format_emits_parseable_events(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    res = invoke("pretrain", "--data", str(corpus), "--out", str(tmp_path / "o"), "--max-seq-len", "32",
                 "--micro-bs", "2", "--max-steps", "2", "--log-format", "json")
    assert res.exit_code == 0, res.output
    kinds = [json.loads(line)["kind"] for line in res.output.splitlines() if line.startswith("{")]
    assert kinds[0] == "banner" and kinds.count("step") == 2 and kinds[-1] == "summary"


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--data", "/nonexistent/x.txt"], "data not found"),
    (["pretrain", "--data", "CORPUS", "--model", "gpt5"], "gpt5"),
    (["pretrain", "--data", "CORPUS", "--global-bs", "10", "--micro-bs", "4"],
     "nearest valid global batch: 8 or 12"),
    (["pretrain", "--data", "CORPUS", "--micro-bs", "0"], "--micro-bs must be positive"),
    (["pretrain", "--data", "CORPUS", "--precision", "fp8"], "--precision fp8: choose auto, fp32"),
    (["pretrain", "--data", "BINARY"], "not UTF-8"),
    (["pretrain", "--data", "CORPUS", "--model", "CORRUPT"], "corrupt"),
    (["pretrain", "--data", "CORPUS", "--max-seq-len", "4096", "--model", "gpt2-tiny"],
     "exceeds the model's context"),
    (["generate", "--model", "/nonexistent", "--prompt", "hi"], "model not found"),
    (["pretrain", "--data", "CORPUS", "--recipe", "/nonexistent.toml"], "recipe not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    corpus = write_corpus(tmp_path / "corpus.txt")
    (tmp_path / "bin.txt").write_bytes(b"hello \xff\xfe world")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps({"format": "microft", "model": {"name": "x", "n_layer": 1,
                                                     "n_head": 1, "n_embd": 8, "n_positions": 16}}))
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 40)
    subst = {"CORPUS": str(corpus), "BINARY": str(tmp_path / "bin.txt"), "CORRUPT": str(corrupt)}
    args = [subst.get(a, a) for a in args] + ["--out", str(tmp_path / "out")] * (args[0] == "pretrain")
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if not ln.startswith(("step", "Effective"))]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not (tmp_path / "out" / "final").exists()


def test_errors_reach_stderr_as_one_line_without_traceback(tmp_path):
    proc = subprocess.run([*MICROFT, "pretrain", "--data", str(tmp_path / "missing.txt"),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data not found: {tmp_path / 'missing.txt'}"]
    assert proc.stdout == ""


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=1000)
    out = tmp_path / "run"
    cmd = [*MICROFT, "pretrain", "--data", str(corpus), "--out", str(out), "--max-seq-len", "32",
           "--micro-bs", "4", "--max-steps", "1000", "--save-every", "1", "--keep-last", "2",
           "--log-format", "plain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from microft.models.load import load_model
    from microft.train.checkpoint import find_latest_checkpoint, load_train_state

    latest = find_latest_checkpoint(out)
    assert latest is not None
    load_model(latest)
    assert load_train_state(latest)["state"]["step"] == int(latest.name.split("-")[1])


def test_sigterm_saves_and_exits_143_then_resume_continues(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=1000)
    out = tmp_path / "run"
    common = ["pretrain", "--data", str(corpus), "--out", str(out), "--max-seq-len", "32", "--micro-bs", "4",
              "--max-steps", "400", "--log-format", "plain"]
    proc = subprocess.Popen([*MICROFT, *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume auto" in err
    res = invoke(*common, "--resume", "auto", "--max-steps", "5")
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output and (out / "final" / "model.safetensors").exists()


def test_every_recipe_loads_and_dry_runs():
    recipes = sorted(Path(__file__).parent.parent.glob("recipes/*.toml"))
    assert len(recipes) >= 4
    for r in recipes:
        first = r.read_text().splitlines()[0]
        assert first.startswith("# microft "), r
        cmd = next((c for c in ("pretrain", "dpo") if f" {c} " in first), "finetune")
        res = invoke(cmd, "--recipe", str(r), "--dry-run", "--max-steps", "7")
        assert res.exit_code == 0, (r, res.output)
        cfg = json.loads(res.output[: res.output.index("\nEffective batch")])
        assert cfg["max_steps"] == 7  # flags override the recipe
        assert "Effective batch:" in res.output


def test_dry_run_rejects_unknown_recipe_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "gpt2"\n')
    res = invoke("finetune", "--recipe", str(bad), "--dry-run")
    assert res.exit_code == 2
    assert "modle" in res.output


def test_two_batch_flags_override_the_recipes_batch_plan(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('# microft finetune --recipe r.toml\nmicro_bs = 4\nglobal_bs = 32\n')
    res = invoke("finetune", "--recipe", str(recipe), "--micro-bs", "1", "--accum", "8", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "Effective batch: 8 = 1 (micro) × 8 (accum) × 1 (device)" in res.output
    res = invoke("finetune", "--recipe", str(recipe), "--micro-bs", "2", "--dry-run")
    assert "Effective batch: 32 = 2 (micro) × 16 (accum) × 1 (device)" in res.output


@pytest.mark.parametrize("flag", [["--lora"], ["--precision", "bf16-true"]])
def test_fsdp_refusals_are_one_line_before_any_worker_starts(tmp_path, flag):
    res = invoke("finetune", "--shard", "fsdp", "--devices", "2", "--out", str(tmp_path / "o"), *flag)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--shard fsdp does not support" in lines[0]
    assert not (tmp_path / "o").exists()


def test_no_tf32_reaches_the_run_config():
    res = invoke("finetune", "--no-tf32", "--dry-run")
    assert res.exit_code == 0, res.output
    assert '"tf32": false' in res.output


def test_dry_run_with_auto_micro_batch_does_not_claim_a_plan():
    """The plan of --micro-bs auto is made at the start (model, data, free memory); the dry run says so rather
    than print 1 × global-batch as it used to."""
    res = invoke("finetune", "--micro-bs", "auto", "--global-bs", "8", "--dry-run")
    assert res.exit_code == 0, res.output
    line = res.output.split("Effective batch: ")[1].splitlines()[0]
    assert line.startswith("--micro-bs auto, chosen at the start") and "global batch 8 kept" in line


def test_generate_refuses_a_prompt_that_is_not_utf8():
    """Undecodable bytes in argv reach Python as lone surrogates: one line, not the tokenizer's traceback."""
    res = invoke("generate", "--model", "gpt2-tiny", "--prompt", "caf\udce9")
    assert res.exit_code == 2 and "not valid UTF-8" in res.output, res.output
