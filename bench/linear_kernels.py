"""Linear layers' kernels on a CPU: torch's `addmm`/`mm` vs oneDNN's linear (`models.linear`).

    .venv/bin/python bench/linear_kernels.py              # writes the doc section
    .venv/bin/python bench/linear_kernels.py --no-write

Measurements, interleaved so that host noise falls on both sides alike:
1. Per shape: the forward (x @ W.T + b) and the backward's two matmuls (dy @ W, dy.T @ x; through oneDNN
   too, the copies of its transposed operands timed with it) of GPT-2's and Qwen3-1.7B's block linears
   at 256 and 1024 rows, each the median rate over the rounds; in fp32,
   and on a CPU with native bf16 (AVX-512 BF16 / AMX) in bf16 as well (torch's `addmm` reaches oneDNN's
   matmul there too: same bits, another call).
2. The whole training step: `bench/steploop.py` (GPT-2 124M, micro-batch 4 x seq 256, the default
   precision: fp32, or bf16-mixed where bf16 is native) in fresh processes alternating MICROFT_ONEDNN=1
   (the default) and 0 (torch's F.linear and mm everywhere).
3. On a CPU without native bf16 only: a bf16 linear's three products through torch's (emulated) bf16
   kernels and through microft's fp32 route (`models.linear`: fp32 products of the bf16 values, rounded).
Only this CPU kind's section of docs/benchmarks.md is rewritten: `## Linear kernels on a CPU` (no native
bf16) or `## Linear kernels on a CPU with native bf16`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time

import torch
from docs_section import publish
from harness import DOC, command_line, load_average, machine, run_config, table

from microft.models.linear import _ONEDNN_LINEAR, ONEDNN_ENV, amd_x86, linear, mm, native_half_matmuls
from microft.models.precision import cpu_supports_bf16

HEADING = "## Linear kernels on a CPU"
HEADING_BF16 = "## Linear kernels on a CPU with native bf16"
HEADING_INTEL_AVX2 = "## Linear kernels on an Intel CPU held to AVX2 (emulated)"
SHAPES = {"gpt2 c_attn": (768, 2304), "gpt2 c_fc": (768, 3072), "gpt2 mlp c_proj": (3072, 768),
          "qwen3-1.7b gate/up": (2048, 6144), "qwen3-1.7b down": (6144, 2048)}


def rate(fn, flop: float, reps: int = 3) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return flop * reps / (time.perf_counter() - t0) / 1e9


def per_shape(rounds: int, rows: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[list[str]]:
    lp = _ONEDNN_LINEAR
    cases = {}
    g = torch.Generator().manual_seed(0)
    for name, (K, N) in SHAPES.items():
        for M in rows:
            shapes = ((M, K), (N, K), (N,), (M, N))
            x, W, b, dy = (torch.randn(*shape, generator=g).to(dtype) for shape in shapes)
            cases[(name, M)] = {"forward, torch": lambda x=x, W=W, b=b: torch.addmm(b, x, W.t()),
                                "forward, oneDNN": lambda x=x, W=W, b=b: lp(x, W, b, "none", [None], ""),
                                "dy @ W, torch": lambda dy=dy, W=W: dy @ W,
                                "dy @ W, oneDNN":
                                    lambda dy=dy, W=W: lp(dy, W.t().contiguous(), None, "none", [None], ""),
                                "dy.T @ x, torch": lambda dy=dy, x=x: dy.t() @ x,
                                "dy.T @ x, oneDNN":
                                    lambda dy=dy, x=x: lp(dy.t().contiguous(), x.t().contiguous(), None,
                                                          "none", [None], "")}, 2 * M * K * N
    got: dict = {}
    for r in range(rounds + 1):  # round 0 warms up (oneDNN builds its kernels per shape)
        for key, (fns, flop) in cases.items():
            for kind, fn in fns.items():
                v = rate(fn, flop)
                if r:
                    got.setdefault((key, kind), []).append(v)
    out = []
    for key in cases:
        m = {kind: statistics.median(got[(key, kind)]) for kind in cases[key][0]}
        out.append([key[0], str(key[1]), f"{m['forward, torch']:.0f}", f"{m['forward, oneDNN']:.0f}",
                    f"{m['forward, oneDNN'] / m['forward, torch']:.2f}×", f"{m['dy @ W, torch']:.0f}",
                    f"{m['dy @ W, oneDNN']:.0f}", f"{m['dy.T @ x, torch']:.0f}",
                    f"{m['dy.T @ x, oneDNN']:.0f}"])
    return out


# (name, in, out, rows): torch's slowest bf16 product takes seconds
BF16_SHAPE = ("gpt2 c_fc", 768, 3072, 256)


def bf16_products(rounds: int) -> list[list[str]]:
    """GFLOP/s of a bf16 linear's forward, dy @ W and dy.T @ x: torch's bf16 kernels vs microft's fp32 route.
    """
    name, K, N, M = BF16_SHAPE
    g = torch.Generator().manual_seed(0)
    x, W, dy = (torch.randn(*s, generator=g).bfloat16() for s in ((M, K), (N, K), (M, N)))
    products = {"forward (x @ W.T)": (lambda: linear(x, W)), "dy @ W": (lambda: mm(dy, W)),
                "dy.T @ x": (lambda: mm(dy.t(), x))}
    got: dict = {}
    for r in range(rounds + 1):  # round 0 warms up
        for kind, fn in products.items():
            for route in ("torch", "microft"):
                with native_half_matmuls() if route == "torch" else contextlib.nullcontext():
                    v = rate(fn, 2 * M * K * N, reps=1)
                if r:
                    got.setdefault((kind, route), []).append(v)
    rows = []
    for kind in products:
        t, m = (statistics.median(got[(kind, route)]) for route in ("torch", "microft"))
        rows.append([f"{name}, {M} rows: {kind}", f"{t:.2f}", f"{m:.0f}", f"{m / t:.0f}×"])
    return rows


def step_ab(rounds: int, env: dict[str, str] | None = None) -> dict[str, list[float]]:
    args = ["--impl", "microft", "--precision", "auto", "--model", "gpt2", "--device", "cpu", "--micro-bs",
            "4", "--seq", "256", "--warmup", "2", "--steps", "3"]
    times: dict[str, list[float]] = {"oneDNN forwards (MICROFT_ONEDNN=1)": [],
                                     "torch's own linears (MICROFT_ONEDNN=0)": []}
    for r in range(rounds):
        for name, side in zip(times, ({ONEDNN_ENV: "1"}, {ONEDNN_ENV: "0"}), strict=True):
            print(f"[linear] step round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            times[name] += run_config(args, {**(env or {}), **side})["step_times"]
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="per-shape rounds")
    p.add_argument("--step-rounds", type=int, default=3, help="interleaved training-step runs per side")
    p.add_argument("--bf16-rounds", type=int, default=2, help="rounds of the emulated-bf16 products")
    p.add_argument("--intel-avx2", action="store_true",
                   help="on an Intel CPU: only the step A/B, held to AVX2 (an Intel laptop without AVX-512), "
                        "in its own section")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.intel_avx2:
        return intel_avx2(a)
    if _ONEDNN_LINEAR is None:
        sys.exit(f"this torch has no oneDNN linear (or {ONEDNN_ENV}=0 is set)")
    started, load_before = datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), load_average()
    native = cpu_supports_bf16()
    headers = ["linear", "rows", "forward, torch addmm", "forward, oneDNN", "oneDNN / addmm",
               "dy @ W, torch mm", "dy @ W, oneDNN (W.T copied)", "dy.T @ x, torch mm",
               "dy.T @ x, oneDNN (dy.T, x.T copied)"]
    shapes = {dt: per_shape(a.rounds, (256, 1024), dt) for dt in ((torch.float32, torch.bfloat16) if native
                                                                   else (torch.float32,))}
    steps = step_ab(a.step_rounds)
    med = {k: statistics.median(v) for k, v in steps.items()}
    on, off = med.values()
    body = (f"Command: {command_line()} ({started}). {machine('cpu')}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_average()}.")
    for dt, rows in shapes.items():
        short = str(dt).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
        body += (f"\n\n{short} "
                 f"GFLOP/s per shape (median of {a.rounds} interleaved rounds; rows = tokens in the "
                 "micro-batch; torch's fp32 `addmm`/`mm` call MKL, its bf16 ones oneDNN's "
                 "matmul):\n\n" + table(headers, rows))
    precision = "bf16-mixed" if native else "fp32"
    body += (f"\n\nThe GPT-2 training step (`bench/steploop.py`, micro-batch 4 × seq 256, {precision}: the "
             f"default here; {a.step_rounds} fresh processes per side, alternating, 3 timed steps each after "
             "2 warm-up steps):\n\n"
             + step_table(steps, med)
             + f"\n\n- oneDNN forwards: {off / on:.2f}× the step rate of torch's own linears. microft "
             "runs the forwards (the blocks' linears, LoRA's and NF4's bases; in fp32 the LM head's logits "
             "too) through oneDNN on an AMD x86 CPU in fp32 (on Intel CPUs MKL's own path was as fast or "
             "faster; `MICROFT_ONEDNN=1` takes it on any CPU), and in bf16 where the CPU has it natively "
             "(under autocast after autocast's casts), and keeps the backward's matmuls in torch's `mm`; "
             "`MICROFT_ONEDNN=0` turns it off.")
    if not native:  # the emulated case only: where bf16 is native, its products are torch's (or oneDNN's) own
        body += ("\n\nbf16 on this CPU, which emulates it (no AVX-512 BF16 / AMX): GFLOP/s of one bf16 "
                 f"linear's products (median of {a.bf16_rounds} rounds), torch's bf16 kernels against "
                 "microft's route (`models.linear`: the bf16 values multiplied in fp32, the result rounded "
                 "to bf16 once):\n\n"
                 + table(["product", "torch bf16", "microft (fp32 route)", "speed-up"],
                         bf16_products(a.bf16_rounds)))
    publish(DOC, HEADING_BF16 if native else HEADING, body, not a.no_write, "linear")


def step_table(steps: dict[str, list[float]], med: dict[str, float]) -> str:
    """Each side's median step time and every step time."""
    return table(["linears", "step time (s, median)", "steps"],
                 [[k, f"{med[k]:.2f}", ", ".join(f"{t:.2f}" for t in v)] for k, v in steps.items()])


def intel_avx2(a) -> None:
    """The fp32 step with oneDNN's forwards and with torch's own linears on an Intel CPU held to AVX2."""
    from speed import AVX2_EMULATION, AVX2_HELD

    if amd_x86():
        sys.exit("--intel-avx2 measures MKL's Intel code path: run it on an Intel CPU")
    started, load_before = datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), load_average()
    steps = step_ab(a.step_rounds, AVX2_EMULATION)
    med = {k: statistics.median(v) for k, v in steps.items()}
    on, off = med.values()
    body = (f"Command: {command_line()} ({started}). {machine('cpu')}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_average()}.\n\nThe GPT-2 training step (`bench/steploop.py`, "
            f"micro-batch 4 × seq 256, precision auto: fp32 here) with {AVX2_HELD}, as on an Intel laptop "
            f"CPU without AVX-512; {a.step_rounds} fresh processes per side, alternating, 3 timed steps each "
            "after 2 warm-up steps:\n\n"
            + step_table(steps, med)
            + f"\n\n- torch's own linears (MKL): {on / off:.2f}× the step rate of oneDNN's forwards "
            "here, so on Intel CPUs microft's fp32 linears and head keep torch's products (`models.linear`: "
            "oneDNN in fp32 on AMD x86 CPUs only; `MICROFT_ONEDNN=1` takes it anywhere).")
    publish(DOC, HEADING_INTEL_AVX2, body, not a.no_write, "linear")


if __name__ == "__main__":
    main()
