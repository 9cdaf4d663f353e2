"""microft and transformers taking turns in one process: their speed ratio on a host whose speed drifts.

    .venv/bin/python bench/paired.py               # GPT-2, micro-batch 4 x seq 256, 10 pairs of steps
    .venv/bin/python bench/paired.py --no-write    # print the section instead of writing docs/benchmarks.md
    .venv/bin/python bench/paired.py --emulate-avx2   # adds the pairs of an emulated AVX2-only CPU (fp32)

bench/speed.py runs each configuration in its own process, one after another, so each has its own
peak memory; but on a machine shared with other jobs (a cloud VM whose cores' speed moved 2x within
minutes) its step times are as much the host's as the code's. Here both models live in one process
and step in turn (the order flips every pair), so the two steps of a pair meet the same minutes of the
host, and the median of the pairs' ratios moves less than a ratio of two runs' medians. Both share one
allocator, set as microft's trainer sets it (`keep_freed_memory`, the control row of bench/speed.py): the
ratio is the code's (model, kernels, loss, optimizer step), not glibc's. One more step of each runs under
torch.profiler, for a side-by-side table of where the time goes. No memory figures: one process holds
both models (bench/speed.py measures memory). With --emulate-avx2 (on a CPU with native bf16) the pairs
run again in a child process held to AVX2 as bench/speed.py's emulated table is (both sides fp32 there):
its own subsection.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch
from docs_section import publish
from harness import DOC, command_line, load_average, machine, model_label, table
from speed import AVX2_EMULATION, AVX2_HEADING, AVX2_HELD, cpu_description, native_bf16
from steploop import breakdown, hf_stepper, make_tokens, microft_stepper
from steploop import parse as steploop_args

from microft.models.config import ModelConfig  # noqa: E402  (harness put the repository on sys.path)
from microft.train.loop import keep_freed_memory  # noqa: E402

HEADING = "## Paired steps in one process"


def timed(step, tokens: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds of one step."""
    t0, c0 = time.perf_counter(), time.process_time()
    step(tokens)
    return time.perf_counter() - t0, time.process_time() - c0


def op_times(step, tokens: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Self CPU seconds per op of one step under torch.profiler, and the same by kind
    (`steploop.breakdown`)."""
    with torch.profiler.profile() as prof:
        step(tokens)
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    return ops, breakdown(prof)


def measure(a) -> dict:
    cfg = ModelConfig.from_preset(a.model)
    dev = torch.device("cpu")
    keep_freed_memory()  # before either model is built: both allocate under the same settings
    hf_precision = "bf16-mixed" if native_bf16("cpu") else "fp32"
    shape = ["--model", a.model, "--micro-bs", str(a.micro_bs), "--seq", str(a.seq)]
    _, hf_step, _ = hf_stepper(cfg, steploop_args(["--impl", "hf", "--precision", hf_precision, *shape]), dev)
    mf_args = steploop_args(["--impl", "microft", "--precision", a.precision, *shape])
    _, mf_step, mf_precision = microft_stepper(cfg, mf_args, dev)
    tokens = make_tokens(a.warmup + a.pairs + 1, a.micro_bs, 1, a.seq, cfg.vocab_size)
    for i in range(a.warmup):
        hf_step(tokens[i])
        mf_step(tokens[i])
    pairs = []
    for i in range(a.pairs):
        tok = tokens[a.warmup + i]
        if i % 2 == 0:
            hf, mf = timed(hf_step, tok), timed(mf_step, tok)
        else:
            mf, hf = timed(mf_step, tok), timed(hf_step, tok)
        pairs.append((hf, mf))
        print(f"[paired] pair {i + 1}/{a.pairs}: transformers {hf[0]:.2f} s, microft {mf[0]:.2f} s, "
              f"ratio {hf[0] / mf[0]:.2f}", file=sys.stderr)
    hf_ops, hf_kinds = op_times(hf_step, tokens[-1])
    mf_ops, mf_kinds = op_times(mf_step, tokens[-1])
    return {"pairs": pairs, "hf_precision": hf_precision, "mf_precision": mf_precision,
            "ops": (hf_ops, mf_ops), "kinds": (hf_kinds, mf_kinds)}


def summary(pairs: list) -> dict[str, float]:
    hf_wall, mf_wall = [p[0][0] for p in pairs], [p[1][0] for p in pairs]
    hf_cpu, mf_cpu = [p[0][1] for p in pairs], [p[1][1] for p in pairs]
    return {"pair_ratio": statistics.median(h / m for h, m in zip(hf_wall, mf_wall)),
            "median_ratio": statistics.median(hf_wall) / statistics.median(mf_wall),
            "cpu_ratio": statistics.median(h / m for h, m in zip(hf_cpu, mf_cpu)),
            "hf_median": statistics.median(hf_wall), "mf_median": statistics.median(mf_wall),
            "spread": max(hf_wall + mf_wall) / min(hf_wall + mf_wall),
            "low": min(h / m for h, m in zip(hf_wall, mf_wall)),
            "high": max(h / m for h, m in zip(hf_wall, mf_wall))}


def op_table(ops: tuple[dict[str, float], dict[str, float]], rows: int) -> str:
    """The `rows` ops that took longest on either side, self time in ms, and each side's total."""
    hf, mf = ops
    names = sorted(set(hf) | set(mf), key=lambda k: -max(hf.get(k, 0.0), mf.get(k, 0.0)))[:rows]
    body = [[f"`{k}`", f"{1e3 * hf.get(k, 0.0):.0f}", f"{1e3 * mf.get(k, 0.0):.0f}"] for k in names]
    body.append(["all ops", f"{1e3 * sum(hf.values()):.0f}", f"{1e3 * sum(mf.values()):.0f}"])
    return table(["op (self time)", "transformers ms", "microft ms"], body)


def section(a, r: dict, started: str, command: str) -> str:
    s = summary(r["pairs"])
    hf_kinds, mf_kinds = r["kinds"]
    rows = [[str(i + 1), f"{hf[0]:.2f}", f"{mf[0]:.2f}", f"{hf[0] / mf[0]:.2f}"]
            for i, (hf, mf) in enumerate(r["pairs"])]
    kinds = [[k, f"{1e3 * hf_kinds[k]:.0f}", f"{1e3 * mf_kinds[k]:.0f}"] for k in hf_kinds]
    return "\n".join([
        f"Command: {command} ({started}). {machine('cpu')}. {cpu_description()}. Load average (1/5/15 min) "
        f"before: {r['load_before']}, after: {r['load_after']}.",
        "",
        f"Shape: {model_label(a.model)}, random init; micro-batch {a.micro_bs} × seq {a.seq} (accum 1); "
        f"transformers {r['hf_precision']} (its faster precision on this kind of CPU: bf16 where the CPU has "
        f"it natively, else fp32) and microft `--precision {a.precision}` ({r['mf_precision']}), both with "
        "fused AdamW, clipping at 1.0, the same steps as bench/speed.py. Both models in one process, one "
        f"allocator set as microft's trainer sets it; {a.warmup} warm-up step{'s' * (a.warmup != 1)} each, "
        f"then {a.pairs} pairs of steps on the same tokens, the "
        "order flipped every pair.",
        "",
        table(["pair", "transformers step (s)", "microft step (s)", "transformers / microft"], rows),
        "",
        f"- microft's tokens/s: **{s['pair_ratio']:.2f}×** transformers' (median of the pairs' ratios); "
        f"{s['median_ratio']:.2f}× as the ratio of the median steps ({s['hf_median']:.2f} s / "
        f"{s['mf_median']:.2f} s); {s['cpu_ratio']:.2f}× on CPU time (median of the pairs). The "
        f"slowest step took {s['spread']:.1f}× the fastest and the pairs' ratios ranged "
        f"{s['low']:.2f}-{s['high']:.2f}: "
        "the host's drift, which pairing lessens (both steps of a pair meet the same minutes) but cannot "
        "cancel within a pair.",
        "",
        "Where the time goes (self time of one more step of each under torch.profiler, after the pairs; the "
        "profiler's own overhead included, which is larger for the side that runs more, smaller ops: compare "
        "the totals with the timed steps above):",
        "",
        table(["kind", "transformers ms", "microft ms"], kinds),
        "",
        op_table(r["ops"], a.rows),
    ])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--precision", default="auto",
                   help="microft's precision (transformers: its faster one here)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--rows", type=int, default=16, help="ops in the profile table")
    p.add_argument("--no-write", action="store_true",
                   help="print the section instead of writing docs/benchmarks.md")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="also run the pairs as an AVX2-only CPU (fp32), in a child process: its own "
                        "subsection")
    p.add_argument("--avx2-pairs", type=int, default=6,
                   help="pairs of the emulated run (its fp32 steps are slower)")
    # the child: print the body only
    p.add_argument("--body-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def avx2_body(a, command: str) -> str:
    """The emulated subsection: this script in a fresh process under AVX2_EMULATION (torch, oneDNN, MKL and
    OpenBLAS read it only at start)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--body-only", "--model", a.model, "--micro-bs",
           str(a.micro_bs), "--seq", str(a.seq), "--precision", a.precision, "--warmup", str(a.warmup),
           "--pairs", str(a.avx2_pairs), "--rows", str(a.rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **AVX2_EMULATION,
                                                                    "MICROFT_PAIRED_COMMAND": command})
    if out.returncode != 0:
        raise RuntimeError(f"the emulated AVX2 pairs failed:\n{out.stderr[-3000:]}")
    return (f"{AVX2_HEADING}\n\nThe same pairs with {AVX2_HELD}, as on the AVX2-only laptop CPUs "
            "most users have: both sides fp32.\n\n" + out.stdout.strip())


def main(argv: list[str] | None = None, command: str | None = None) -> dict[str, float]:
    a = parse(argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    before = load_average()
    command = command or os.environ.get("MICROFT_PAIRED_COMMAND") or command_line()
    r = measure(a)
    r["load_before"], r["load_after"] = before, load_average()
    body, nums = section(a, r, started, command), summary(r["pairs"])
    if a.body_only:
        print(body)
        return nums
    if a.emulate_avx2 and native_bf16("cpu"):
        body += "\n\n" + avx2_body(a, command)
    publish(DOC, HEADING, body, not a.no_write, "paired")
    return nums


if __name__ == "__main__":
    main()
