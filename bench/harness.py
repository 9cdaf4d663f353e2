"""Shared pieces of the bench scripts: run one configuration in a fresh process, probe the peak, format.

Each configuration runs in its own subprocess (`bench/steploop.py`), so its peak RSS is its own;
the parent only measures the matmul peak and writes the tables.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from microft.models.config import ModelConfig  # noqa: E402
from microft.perf import cpu_model, flops_per_token, probe_rates  # noqa: E402

STEPLOOP = Path(__file__).with_name("steploop.py")
DOC = ROOT / "docs" / "benchmarks.md"


def run_config(args: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run `steploop.py ARGS` in a fresh Python process; return its JSON record."""
    cmd = [sys.executable, str(STEPLOOP), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    rec = json.loads(lines[-1])
    rec["args"], rec["env"], rec["wall_total"] = args, env or {}, time.perf_counter() - t0
    return rec


ENGINE_NAMES = {"torch": "torch's `@`", "onednn": "oneDNN's linear", "numpy": "numpy's BLAS"}


def peak_rates(device: str, dtype: str, seconds: float = 12.0) -> dict[str, float]:
    """Each matmul engine's best sustained large-matmul rate, measured now (`perf.probe_rates`, never the
    cache); the peak is the largest."""
    return probe_rates(device, dtype, seconds)


def best_rates(*probes: dict[str, float]) -> dict[str, float]:
    """Per engine, the best of several probes (before and after the runs)."""
    return {e: max(p.get(e, 0.0) for p in probes) for e in probes[0]}


def rates_text(rates: dict[str, float]) -> str:
    """`torch's `@` 124, oneDNN's linear 121, numpy's BLAS 156 GFLOP/s`: every engine the peak was
    the best of."""
    parts = [f"{ENGINE_NAMES.get(e, e)} {r / 1e9:.0f}" for e, r in rates.items()]
    return ", ".join(parts) + " GFLOP/s"


def model_label(model: str) -> str:
    """`gpt2` (124M): the preset name and its parameter count as GPT-2 counts them."""
    return f"`{model}` ({ModelConfig.from_preset(model).num_params() / 1e6:.0f}M parameters)"


def model_flops_per_token(model: str, seq: int) -> float:
    return flops_per_token(ModelConfig.from_preset(model), seq)


def cpu_name() -> str:
    return cpu_model()


def machine(device: str) -> str:
    """One line: hardware, threads, software versions."""
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    if device == "cuda":
        hw = torch.cuda.get_device_name(0)
    else:
        from microft.train.step import cpu_supports_bf16

        hw = f"{cpu_name()}, {os.cpu_count()} cores, AVX-512 BF16: {'yes' if cpu_supports_bf16() else 'no'}"
    return f"{hw}; torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {tf}, " \
           f"Python {platform.python_version()}"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def command_line() -> str:
    """How this script was invoked (relative to the repository root), as Markdown code."""
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    cmd = f"`{' '.join(['.venv/bin/python', str(rel), *sys.argv[1:]])}`"
    return f"`make bench` (= {cmd})" if rel == Path("bench/run_all.py") and len(sys.argv) == 1 else cmd
