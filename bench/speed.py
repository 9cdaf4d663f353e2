"""microft against a plain transformers GPT2LMHeadModel training loop: same shape, data and steps.

    .venv/bin/python bench/speed.py                       # CPU 124M, micro-bs 4 × seq 256: the section
    .venv/bin/python bench/speed.py --rounds 1 --no-write # a quick check, prints the section only
    .venv/bin/python bench/speed.py --emulate-avx2        # adds the fp32 table of an emulated AVX2-only CPU

Each configuration runs in a fresh subprocess (bench/steploop.py) so its peak RSS is its own.
transformers runs in fp32 and in bf16 autocast, both with torch's fused AdamW (its fastest
optimizer on CPU); microft runs its `auto` precision, and `bf16-true` (± gradient checkpointing)
for the memory target, with its own trainer step functions. Ratios compare microft with
transformers' faster precision. The GPU part (seq 1024) runs only
when CUDA is available. With --emulate-avx2 (on a CPU with native bf16) the CPU runs are repeated
with torch, oneDNN, MKL and OpenBLAS held to AVX2 and microft's bf16 detection off, as on the
AVX2-only laptops most users have; that table is the `### fp32 on an AVX2-only CPU (emulated)` subsection.
Only the `## Speed vs transformers` section of docs/benchmarks.md is rewritten, or, on a CPU without
native bf16, `## Speed vs transformers on an AVX2-only CPU` (so both kinds of machine keep their table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys

import torch
from docs_section import publish
from harness import (
    DOC,
    best_rates,
    command_line,
    gib,
    load_average,
    machine,
    median,
    model_flops_per_token,
    model_label,
    peak_rates,
    rates_text,
    run_config,
    table,
)

from microft.perf import PROBE_SHAPES  # noqa: E402  (harness put the repository on sys.path)

HEADING = "## Speed vs transformers"
TARGET_SPEEDUP, TARGET_MFU, TARGET_MEMORY = 1.5, 0.60, 0.60


def shape_args(a, device: str, seq: int, micro_bs: int, warmup: int, steps: int) -> list[str]:
    return ["--model", a.model, "--device", device, "--micro-bs", str(micro_bs), "--accum", str(a.accum),
            "--seq", str(seq), "--warmup", str(warmup), "--steps", str(steps)]


# = keep_freed_memory()
GLIBC_KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
EMULATION_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE",
                 "MICROFT_CPU_BF16")
# an AVX2-only CPU (no AVX-512, so no native bf16): torch's kernels, oneDNN, MKL and numpy's OpenBLAS (one
# of the peak probe's engines) held to AVX2, and microft's bf16 detection off (its auto precision then
# picks fp32, as on such a CPU). Without OPENBLAS_CORETYPE the probe's numpy engine ran AVX-512 kernels
# (163 GFLOP/s against torch's 89 at AVX2) and so overstated the emulated CPU's peak.
AVX2_EMULATION = dict(zip(EMULATION_ENV, ("avx2", "AVX2", "AVX2", "Haswell", "0"), strict=True))
AVX2_HEADING = "### fp32 on an AVX2-only CPU (emulated)"
AVX2_HELD = ("torch's kernels, oneDNN, MKL and OpenBLAS held to AVX2 ("
             + ", ".join(f"`{k}={v}`" for k, v in AVX2_EMULATION.items()) + ")")  # the docs' wording of it
AVX2_NATIVE_HEADING = "## Speed vs transformers on an AVX2-only CPU"  # where this script runs on one


@contextlib.contextmanager
def emulated_avx2():
    """Set AVX2_EMULATION in os.environ (the child processes inherit it), restore it afterwards."""
    saved = {k: os.environ.get(k) for k in AVX2_EMULATION}
    os.environ.update(AVX2_EMULATION)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def child_peak_rates(dtype: str) -> dict[str, float]:
    """`peak_rates` in a fresh process: torch, oneDNN, MKL and OpenBLAS read the emulation variables
    only at start."""
    code = f"import json; from harness import peak_rates; print(json.dumps(peak_rates('cpu', {dtype!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def native_bf16(device: str) -> bool:
    """Whether bf16 is a fair candidate here: on CPU only with AVX-512 BF16 / AMX kernels (else emulated)."""
    if device != "cpu":
        return True
    from microft.train.step import cpu_supports_bf16

    return cpu_supports_bf16()


def cpu_description() -> str:
    """The CPU's model, its SIMD flags that matter for training, torch's kernel level, any emulation set."""
    from microft.perf import cpu_model

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = ", ".join(f for f in CPU_FLAGS if f in flags) or "unknown"
    env = ", ".join(f"{k}={os.environ[k]}" for k in EMULATION_ENV if k in os.environ)
    # as children see
    kernels = os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    return (f"CPU {cpu_model()}; flags: {have}; torch kernels: {kernels}; "
            f"native bf16: {'yes' if native_bf16('cpu') else 'no (bf16 is emulated, so not a candidate)'}"
            + (f"; emulating a smaller CPU with {env}" if env else ""))


def configs(a, device: str, first_round: bool) -> dict[str, list[str]]:
    """name -> steploop arguments (shape arguments added by the caller).

    transformers fp32 only decides transformers' faster precision, so it runs in the first round only;
    the op breakdown (one extra profiled step) is taken in the first round too.
    Where bf16 is emulated (a CPU without AVX-512 BF16/AMX) bf16 is no candidate: transformers runs
    fp32 only (every round), and the bf16-true memory runs are left out (emulated bf16 is not a setting
    anyone would train with).
    """
    profile = ["--breakdown"] if first_round else []
    bf16 = native_bf16(device)
    runs = {"microft auto": ["--impl", "microft", "--precision", "auto", *profile]}
    if bf16:
        runs = {"transformers bf16": ["--impl", "hf", "--precision", "bf16-mixed", *profile], **runs,
                "microft bf16-true": ["--impl", "microft", "--precision", "bf16-true"],
                "microft bf16-true, grad ckpt": ["--impl", "microft", "--precision", "bf16-true",
                                                 "--grad-ckpt"]}
    if first_round or not bf16:
        runs["transformers fp32"] = ["--impl", "hf", "--precision", "fp32", *([] if bf16 else profile)]
    hf_prec = "bf16-mixed" if bf16 else "fp32"
    if a.hf_default_adamw:
        runs[f"transformers {hf_prec[:4]}, default AdamW"] = ["--impl", "hf", "--precision", hf_prec,
                                                              "--hf-optim", "default"]
    if a.hf_malloc and device == "cpu":
        runs[f"transformers {hf_prec[:4]}, glibc as microft"] = ["--impl", "hf", "--precision", hf_prec]
    if a.compile:
        runs["microft auto --compile"] = ["--impl", "microft", "--precision", "auto", "--compile"]
    return runs


def measure(a, device: str, seq: int, micro_bs: int, warmup: int, steps: int) -> dict[str, dict]:
    """Run every configuration `a.rounds` times (interleaved); pool the step times, keep the worst peak."""
    shape = shape_args(a, device, seq, micro_bs, warmup, steps)
    pooled: dict[str, dict] = {}
    for r in range(a.rounds):
        for name, extra in configs(a, device, first_round=r == 0).items():
            print(f"[speed] {device} round {r + 1}/{a.rounds}: {name} ...", file=sys.stderr, flush=True)
            rec = run_config(shape + extra, env=GLIBC_KEEP_FREED if "glibc" in name else None)
            print(f"[speed]   step {median(rec['step_times']):.2f} s, peak {gib(rec['peak_bytes'])}",
                  file=sys.stderr, flush=True)
            if name in pooled:
                p = pooled[name]
                p["step_times"] += rec["step_times"]
                p["cpu_times"] += rec["cpu_times"]
                p["peak_bytes"] = max(p["peak_bytes"], rec["peak_bytes"])
            else:
                pooled[name] = rec
    for rec in pooled.values():
        rec["step_time"] = median(rec["step_times"])
        rec["cpu_time"] = median(rec["cpu_times"])
        rec["tokens_per_sec"] = rec["tokens_per_step"] / rec["step_time"]
    return pooled


def stock_transformers(runs: dict[str, dict]) -> dict[str, dict]:
    """transformers runs as shipped (fused AdamW, default allocator): the candidates for its fastest."""
    return {k: v for k, v in runs.items() if k.startswith("transformers") and v["hf_optim"] == "fused"
            and not v["env"]}


def optimizer_label(r: dict) -> str:
    if r["impl"] == "microft" and r["precision"] == "bf16-true":
        return "MasterAdamW (fused AdamW kernel on fp32 master chunks)"
    return "fused AdamW" if r["hf_optim"] == "fused" else "AdamW (torch default)"


def result_table(runs: dict[str, dict], fpt: float, peak: float, best_hf: str, device: str) -> str:
    base = runs[best_hf]
    rows = []
    for name, r in runs.items():
        mem_kind = "peak allocated" if device == "cuda" else "peak RSS"
        rows.append([
            f"**{name}**" if name.startswith("microft") else name,
            r["precision"],
            optimizer_label(r),
            f"{r['step_time']:.2f}",
            f"{r['cpu_time']:.2f}" if device == "cpu" else "-",
            f"{r['tokens_per_sec']:.0f}",
            f"{100 * r['tokens_per_sec'] * fpt / peak:.0f} %",
            f"{gib(r['peak_bytes'])} ({mem_kind})",
            f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}×",
        ])
    header = ["run", "precision", "optimizer", "step time (s, median)", "CPU s / step", "tokens/s", "MFU",
              "peak memory", "tokens/s vs " + best_hf]
    return table(header, rows)


def breakdown_table(runs: dict[str, dict]) -> str:
    """Share of one profiled step (run after the timed ones) per kind of op."""
    rows = []
    for name, r in runs.items():
        b = r.get("breakdown")
        if not b:
            continue
        total = sum(b.values()) or 1.0
        kinds = ("matmul", "attention", "optimizer", "other")
        rows.append([name] + [f"{100 * b[k] / total:.0f} %" for k in kinds] + [f"{total:.2f}"])
    header = ["run", "matmuls (mm/addmm, oneDNN linear)", "attention (SDPA, bmm)", "fused AdamW",
              "everything else", "profiled step (s)"]
    return table(header, rows) if rows else ""


def verdicts(runs: dict[str, dict], fpt: float, peak: float, best_hf: str,
             mfu_target: float = TARGET_MFU) -> tuple[str, dict]:
    mf, hf = runs["microft auto"], runs[best_hf]
    hf_same = (runs.get("transformers bf16") if mf["precision"].startswith("bf16")
               else runs["transformers fp32"])
    speedup = mf["tokens_per_sec"] / hf["tokens_per_sec"]
    cpu_speedup = hf["cpu_time"] / mf["cpu_time"] if mf.get("cpu_time") else None
    mfu = mf["tokens_per_sec"] * fpt / peak
    mem = mf["peak_bytes"] / hf_same["peak_bytes"]
    lean = runs.get("microft bf16-true")
    lean_mem = lean["peak_bytes"] / hf_same["peak_bytes"] if lean else None
    ck = runs.get("microft bf16-true, grad ckpt")
    ck_mem = ck["peak_bytes"] / hf_same["peak_bytes"] if ck else None
    # memory above the process's own baseline and above fp32 weights + grads + AdamW moments (16 B/param)
    t_mf = mf["peak_bytes"] - mf["baseline_bytes"] - 16 * mf["n_params"]
    t_hf = hf_same["peak_bytes"] - hf_same["baseline_bytes"] - 16 * hf_same["n_params"]

    def ok(good: bool) -> str:
        return "met" if good else "**not met**"

    lines = [
        f"- tokens/s: microft {speedup:.2f}× transformers' fastest ({best_hf}); target ≥ "
        f"{TARGET_SPEEDUP}×: {ok(speedup >= TARGET_SPEEDUP)}."
        + (f" On CPU time per step, which other jobs on the machine disturb less: {cpu_speedup:.2f}×."
           if cpu_speedup and mf["device"] == "cpu" else ""),
        f"- MFU: microft {100 * mfu:.0f} % of the measured {peak_dtype(mf['precision'])} matmul peak, "
        f"{peak / 1e9:.0f} GFLOP/s (the probe it divides by); target ≥ {100 * mfu_target:.0f} %: "
        f"{ok(mfu >= mfu_target)}.",
        f"- peak memory: microft auto {mem:.2f}× transformers' at the same precision "
        f"({hf_same['precision']}); target ≤ {TARGET_MEMORY}×: {ok(mem <= TARGET_MEMORY)}."
        + (" microft bf16-true, which keeps exact fp32 master weights too (bf16 weights + 16 more bits "
           "per weight in the optimizer, bf16 moments: 10 bytes per parameter with its gradient instead "
           f"of 16): {lean_mem:.2f}×, {ok(lean_mem <= TARGET_MEMORY)}; its tokens/s: "
           f"{lean['tokens_per_sec'] / hf['tokens_per_sec']:.2f}× transformers'." if lean else "")
        + (f" With gradient checkpointing as well: {ck_mem:.2f}×, {ok(ck_mem <= TARGET_MEMORY)}, at "
           f"{ck['tokens_per_sec'] / hf['tokens_per_sec']:.2f}× transformers' tokens/s." if ck else ""),
    ]
    if t_hf > 0:
        lines.append(
            "- peak memory above the process baseline (CPU: RSS before the model is built) and the 16 "
            f"bytes per parameter of fp32 weights, gradients and AdamW moments ({gib(16 * mf['n_params'])}, "
            f"the same on both sides): microft {gib(t_mf)}, transformers {gib(t_hf)} ({t_mf / t_hf:.2f}×).")
    return "\n".join(lines), {"speedup": speedup, "cpu_speedup": cpu_speedup, "mfu": mfu, "memory_ratio": mem,
                              "memory_ratio_bf16_true": lean_mem, "memory_ratio_bf16_true_ckpt": ck_mem}


def peak_dtype(precision: str) -> str:
    return "bfloat16" if precision.startswith("bf16") else "float32"


def cpu_section(a, started: str, command: str, emulated: bool = False) -> tuple[str, dict]:
    """The CPU table; `emulated`: run inside `emulated_avx2()` (its peak probe then runs in a child too)."""
    load_before = load_average()
    from microft.train.step import resolve_precision

    # the MFU of microft auto divides by this
    dtype = peak_dtype(resolve_precision("auto", torch.device("cpu")))
    probe = child_peak_rates if emulated else (lambda d: peak_rates("cpu", d))
    before = probe(dtype)
    runs = measure(a, "cpu", a.seq, a.micro_bs, a.warmup, a.steps)
    rates = best_rates(before, probe(dtype))
    peak = max(rates.values())
    fpt = model_flops_per_token(a.model, a.seq)
    hf = stock_transformers(runs)
    best_hf = max(hf, key=lambda k: hf[k]["tokens_per_sec"])
    summary, nums = verdicts(runs, fpt, peak, best_hf)
    mf = runs["microft auto"]
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    text = (f"Command: {command} ({started}). {machine('cpu')}. {cpu_description()}. Load average (1/5/15 "
            f"min) before: {load_before}, after: {load_average()}.\n\n"
            f"Shape: {model_label(a.model)}, random init, no download; micro-batch {a.micro_bs} × seq "
            f"{a.seq} × accum {a.accum} ({mf['tokens_per_step']} tokens per optimizer step); the same "
            f"random tokens for every run; {plural(a.warmup, 'warm-up step')}, then "
            f"{plural(a.steps, 'timed step')} per run; {plural(a.rounds, 'round')} of runs, interleaved "
            "(transformers fp32, which only decides transformers' faster precision, in the first round "
            "only); step times pooled over the rounds. Every run is a fresh process, so its peak RSS is its "
            "own high-water mark (Python and torch included). One step = forward, backward, grad-norm "
            "clipping at 1.0, AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices) and reading the "
            f"loss back. MFU = tokens/s × {fpt / 1e6:.0f} MFLOP/token (6 × matmul parameters + attention, "
            f"`perf.flops_per_token`) ÷ the measured {dtype} matmul peak, {peak / 1e9:.0f} GFLOP/s: the "
            f"best sustained rate of large warmed matmuls ({'², '.join(map(str, PROBE_SHAPES['cpu']))}²) "
            "through any of the matmul engines at hand, probed before and after the runs "
            f"(`perf.probe_rates`; per engine: {rates_text(rates)}). \"CPU s / step\" is the process's CPU "
            "time per step: other jobs on the machine stretch the wall time more than the CPU time (the CPU "
            "time grows too, as waiting threads spin).\n\n"
            f"{result_table(runs, fpt, peak, best_hf, 'cpu')}\n\n"
            f"{summary}\n\n"
            "Where the time goes (op self time in one extra step under `torch.profiler`, after the timed "
            "steps):\n\n"
            f"{breakdown_table(runs)}")
    notes = ("- transformers: `GPT2LMHeadModel` (SDPA attention, tied LM head, its built-in loss with "
             "`labels=input_ids`) and `torch.optim.AdamW(fused=True)`, which is also what transformers' "
             "`Trainer` uses by default with torch ≥ 2.8. torch's plain `AdamW()` default on CPU is the "
             "per-parameter for-loop, several times slower; `--hf-default-adamw` adds that run.\n- microft: "
             "`Transformer` with the vocabulary padded to a multiple of 64, the chunked fused cross-entropy "
             "(no full-batch fp32 logits; softmax in place; the tied head hands its gradient to the "
             "embedding, so no vocabulary-sized gradient is zero-filled or summed out of place), causal "
             "attention as plain bf16 ops up to 256 positions on CPU (0.4-0.7× the time of SDPA's flash "
             "kernel there), in fp32 on an AMD CPU the linears' forwards and the head's logits through "
             "oneDNN (MKL's own path on Intel) (`models.linear`, `bench/linear_kernels.py`), the trainer's "
             "own `micro_step` / `clip_gradients` / `optimizer_step` with fused AdamW (the clip handed to "
             "its kernel as the divisor it applies to each gradient it reads, not a pass of its own), and "
             "`trainer.keep_freed_memory()` as `train()` does on CPU. \"microft bf16-true\" runs the same "
             "step on bf16 weights with `optim.MasterAdamW` (fused AdamW on fp32 working copies of the "
             "exact master weights, 2^20 at a time). The first 2 steps fault in the optimizer state and the "
             "allocator's heap, so they are warm-up.\n- `trainer.keep_freed_memory()` is a glibc allocator "
             "setting (`mallopt`: no per-allocation mmap, no trimming) that spares every step the kernel's "
             "page faults for its large temporaries; any PyTorch program could set it, so the run "
             "\"transformers bf16, glibc as microft\" gives transformers the same setting (through "
             "`MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_`) as a control; it is not a candidate for "
             "transformers' fastest configuration.")
    if not emulated:  # the notes on both implementations: once, under the main table
        text += "\n\n" + notes
    return text, {"runs": runs, "peak_flops": peak, "peak_rates": rates, "peak_dtype": dtype, **nums}


def avx2_section(a, started: str, command: str) -> tuple[str, dict | None]:
    """`### fp32 on an AVX2-only CPU (emulated)`: the CPU runs again under AVX2_EMULATION."""
    if not native_bf16("cpu"):
        return (f"{AVX2_HEADING}\n\nNot run: this CPU has no native bf16, so the table above is already the "
                "fp32 one an AVX2-only CPU gets."), None
    with emulated_avx2():
        body, nums = cpu_section(a, started, command, emulated=True)
    return (f"{AVX2_HEADING}\n\nThe same runs with {AVX2_HELD}: the AVX2-only laptop CPU most users "
            "have, where bf16 is emulated, so microft's `auto` is fp32 and transformers' candidate is "
            "fp32. The matmuls are the machine's own at AVX2 width, so the ratios, not the absolute rates, "
            "carry over.\n\n"
            + body), nums


def gpu_section(a) -> str:
    if not torch.cuda.is_available():
        return ("### GPU (seq 1024)\n\nSkipped: no CUDA device in this session. On a GPU the same command "
                f"adds this table: micro-batch {a.gpu_micro_bs} × seq 1024, `max_memory_allocated` as peak "
                "memory, MFU against the measured bf16 matmul peak.")
    peak = max(peak_rates("cuda", "bfloat16").values())
    runs = measure(a, "cuda", 1024, a.gpu_micro_bs, max(a.warmup, 3), max(a.steps, 10))
    fpt = model_flops_per_token(a.model, 1024)
    hf = stock_transformers(runs)
    best_hf = max(hf, key=lambda k: hf[k]["tokens_per_sec"])
    summary, _ = verdicts(runs, fpt, peak, best_hf, mfu_target=0.45)
    return (f"### GPU (seq 1024)\n\n{machine('cuda')}. Micro-batch {a.gpu_micro_bs} × seq 1024; "
            f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (the best sustained rate of large warmed "
            "matmuls, `perf.probe_rates`).\n\n"
            f"{result_table(runs, fpt, peak, best_hf, 'cuda')}\n\n{summary}\n\n{breakdown_table(runs)}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per configuration, interleaved (fp32: first round only)")
    p.add_argument("--gpu-micro-bs", type=int, default=8)
    p.add_argument("--hf-default-adamw", action="store_true",
                   help="also run transformers with torch's default AdamW")
    p.add_argument("--no-hf-malloc", dest="hf_malloc", action="store_false",
                   help="skip the transformers bf16 run with microft's glibc allocator settings")
    p.add_argument("--compile", action="store_true",
                   help="also run microft with torch.compile (slow to compile)")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="also run the CPU table as an AVX2-only CPU (fp32): its own subsection")
    p.add_argument("--only-avx2", action="store_true", help="run and print the emulated AVX2 subsection only")
    p.add_argument("--no-write", action="store_true",
                   help="print the section instead of writing docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    a = parse(argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if a.only_avx2:  # a quick look at the emulated table alone; the doc is not touched
        print(avx2_section(a, started, command or command_line())[0])
        return {}
    body, nums = cpu_section(a, started, command or command_line())
    if a.emulate_avx2:
        text, avx2 = avx2_section(a, started, command or command_line())
        body += "\n\n" + text
        if avx2:
            nums["avx2"] = avx2
    if not a.no_gpu:
        body += "\n\n" + gpu_section(a)
    heading = HEADING if native_bf16("cpu") else AVX2_NATIVE_HEADING  # each kind of CPU keeps its own section
    publish(DOC, heading, body, not a.no_write, "speed")
    return nums


if __name__ == "__main__":
    main()
