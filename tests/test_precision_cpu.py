"""Every --precision on this CPU as a user runs it: a model wide enough for models.linear's oneDNN routes
(gpt2-mini's blocks are 256 wide), two steps through the CLI, a summary.json whose MFU is at most 100 %, and
a resume. `make test-avx2` runs this file, tests/test_linear.py and tests/test_perf.py again with the CPU held
to AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, ...): what an AVX2-only CPU runs, checked on any CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from microft.cli import app
from tests.test_finetune import alpaca_file

runner = CliRunner()
PRECISIONS = ["fp32", "bf16-mixed", "bf16-true", "fp16-mixed"]


def _finetune(data, out, precision: str, steps: int, *extra: str):
    args = ["finetune", "--model", "gpt2-mini", "--data", str(data), "--precision", precision, "--micro-bs",
            "2", "--global-bs", "2", "--max-steps", str(steps), "--max-seq-len", "64", "--eval-every", "1",
            "--log-format", "plain", "--out", str(out), *extra]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_a_256_wide_model_writes_its_summary_and_resumes(tmp_path, precision):
    data = alpaca_file(tmp_path / "data.json", n=24)
    out = tmp_path / "run"
    output, summary = _finetune(data, out, precision, 2)
    assert summary["steps"] == 2 and math.isfinite(summary["best_val_loss"])
    assert 0 < summary["mfu"] <= 1.0
    mfu_line = next(line for line in output.splitlines() if line.lstrip().startswith("MFU"))
    assert float(mfu_line.split(":", 1)[1].split("%")[0]) <= 100.0
    assert summary["verdict"].startswith("too short to judge")
    _, resumed = _finetune(data, out, precision, 3, "--resume", "auto")
    assert resumed["steps"] == 3
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in dict.fromkeys(steps) if s] == [1, 2, 3]  # continued from step 2, not started over


def test_a_cpu_held_to_avx2_is_seen_as_one(monkeypatch):
    """Under `make test-avx2` (or on an AVX2-only CPU) the detection says what the kernels can do: no native
    bf16, no oneDNN bf16 or fp16 linear, `auto` is fp32; elsewhere there is nothing to check here."""
    from microft.models.linear import onednn_runs
    from microft.models.precision import cpu_supports_bf16, native_cpu_bf16, onednn_isa_without_bf16
    from microft.train.step import resolve_precision

    if not onednn_isa_without_bf16() and torch.backends.cpu.get_cpu_capability().lower() != "avx2":
        pytest.skip("this CPU is not held to AVX2 (make test-avx2 holds it)")
    monkeypatch.delenv("MICROFT_CPU_BF16", raising=False)
    assert not native_cpu_bf16() and not cpu_supports_bf16()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    if onednn_isa_without_bf16():
        assert not onednn_runs(torch.bfloat16) and not onednn_runs(torch.float16)
