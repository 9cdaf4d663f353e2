"""What a newcomer meets without choosing anything: evaluation by default, a resume command that resumes,
files with the user's permissions, numbers that say what they count, the defaults in --help."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from typer.testing import CliRunner

from microft.cli import app
from microft.config import EVALS_PER_RUN, BatchPlan
from microft.train.loop import eval_cadence, resume_command, train
from microft.train.sinks import plot_curves, smoothed
from microft.ui import TrainReporter, shorten_left, summary_lines
from tests.helpers import masked_samples, run_config, tiny_model
from tests.test_finetune import alpaca_file

runner = CliRunner()


@pytest.mark.parametrize(("total", "every"), [(1, 1), (9, 1), (10, 1), (11, 2), (40, 4), (1500, 150)])
def test_default_cadence_is_about_ten_evaluations(total, every):
    assert eval_cadence(None, total) == every
    assert total // every <= EVALS_PER_RUN
    assert total <= EVALS_PER_RUN or total // every >= EVALS_PER_RUN // 2
    assert eval_cadence(0, total) == 0 and eval_cadence(7, total) == 7  # given: kept


def test_a_default_run_evaluates_keeps_the_best_and_gives_a_verdict(tmp_path):
    cfg = run_config(tmp_path, max_steps=24)
    cfg = cfg.model_copy(update={"eval_every": None})  # the RunConfig default
    assert type(cfg).model_fields["eval_every"].default is None
    events: list[dict] = []
    train_set, val_set = masked_samples(24, seed=1, max_len=12), masked_samples(4, seed=2, max_len=12)
    summary = train(tiny_model(), train_set, val_set, cfg, BatchPlan(micro_bs=1, accum=1), events.append)
    assert [e["step"] for e in events if e["kind"] == "eval"] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    assert (tmp_path / "best" / "model.safetensors").exists()
    # 9 over 24 steps
    assert not summary["verdict"].startswith(("not enough evaluations", "too short to judge"))
    assert cfg.model_copy(update={"eval_every": 0}).eval_every == 0  # 0 still turns it off


def test_finetune_cli_default_writes_best_and_a_verdict(tmp_path):
    data = alpaca_file(tmp_path / "data.json")
    res = runner.invoke(app, ["finetune", "--model", "gpt2-tiny", "--data", str(data),
                              "--out", str(tmp_path / "o"), "--micro-bs", "2", "--max-steps", "3",
                              "--max-seq-len", "48", "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "best" / "model.safetensors").exists()
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["best_val_loss"] is not None and s["verdict"].startswith("too short to judge")  # 3 steps
    # what each throughput counts is said; the training-only figure is the larger one
    assert s["train_tokens_per_sec"] >= s["tokens_per_sec"] > 0
    assert "while training" in res.output and "wall time" in res.output
    # weight files follow the umask (safetensors alone would write 0600)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("final/model.safetensors", "best/model.safetensors", "final/config.json"):
        assert stat.S_IMODE((tmp_path / "o" / f).stat().st_mode) == 0o666 & ~mask, f


def test_resume_command_names_the_output_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/bin/microft", "finetune", "--micro-bs", "1", "--accum", "8"])
    cmd = resume_command(tmp_path / "runs" / "demo-1")
    out = tmp_path / "runs" / "demo-1"
    assert cmd == f"microft finetune --micro-bs 1 --accum 8 --out {out} --resume auto"
    monkeypatch.setattr(sys, "argv", ["/x/bin/microft", "finetune", "--out", "mine"])
    assert resume_command(tmp_path) == "microft finetune --out mine --resume auto"


def test_sample_prompts_are_cut_at_a_word():
    text = ("Below is an instruction that describes a task.\n\n### Instruction:\nName the three primary "
            "colours.\n")
    short = shorten_left(text, 40)
    assert short.startswith("…") and text.endswith(short[1:]) and len(short) <= 41
    assert text[-len(short[1:]) - 1].isspace()  # what was dropped ends at a word boundary
    assert shorten_left("short", 40) == "short"


def test_summary_names_both_throughputs():
    e = {"steps": 3, "time_s": 10.0, "tokens": 3000, "tokens_per_sec": 300.0, "train_tokens_per_sec": 900.0,
         "final_loss": 1.0, "best_val_loss": 0.9, "best_step": 3, "peak_rss": 1, "mfu": 0.1,
         "peak_flops": 1e12,
         "peak_flops_source": "x", "verdict": "v", "final_dir": "d"}
    row = dict(summary_lines(e))["tokens"]
    assert "900 tokens/s while training" in row and "300 tokens/s over the wall time" in row
    TrainReporter("plain")  # renders without a terminal


def test_learning_curve_has_a_title_a_smoothed_line_and_an_lr_axis(tmp_path):
    pytest.importorskip("matplotlib")
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no ramp from 0
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": i, "loss": 3 - i / 10, "lr": 1e-3}) + "\n" for i in range(1, 11))
                 + json.dumps({"step": 10, "val_loss": 2.5}) + "\n")
    import matplotlib.pyplot as plt

    figs: list = []
    real_close = plt.close
    plt.close = lambda fig=None: figs.append(fig)  # keep the figure to look at it
    try:
        assert plot_curves(m, tmp_path / "c.png", "demo-run: gpt2-tiny") == tmp_path / "c.png"
    finally:
        plt.close = real_close
    fig = figs[0]
    ax, ax2 = fig.axes
    assert ax.get_title() == "demo-run: gpt2-tiny" and ax2.get_ylabel() == "learning rate"
    assert {ln.get_label() for ln in ax.lines} == {"train (per step)", "train (smoothed)", "val"}
    real_close(fig)


def test_help_shows_every_run_option_default():
    res = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    for flag, default in [("--eval-every", "about 10 times a run"), ("--val-frac", "0.1"), ("--lr", "0.0003"),
                          ("--lora", "off"), ("--out", "runs/microft"), ("--micro-bs", "default: 1")]:
        line = next(ln for ln in res.output.splitlines() if f" {flag} " in ln)
        assert "default" in line and default in line, line


def test_generate_takes_alpacas_input(tmp_path):
    res = runner.invoke(app, ["generate", "--model", "gpt2-tiny", "--prompt", "Reverse the words.", "--input",
                              "red green", "--template", "alpaca", "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    prompt = json.loads(res.output)["prompt"]
    assert "### Input:\nred green" in prompt and "Reverse the words." in prompt
    res = runner.invoke(app, ["generate", "--model", "gpt2-tiny", "--prompt", "x", "--input", "y"])
    assert res.exit_code == 2 and "--template" in res.output
