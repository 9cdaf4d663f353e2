"""microft's trainer step on the 124M shape for every precision, with gradient checkpointing off and on.

    .venv/bin/python bench/trainer_matrix.py                        # writes the doc section
    .venv/bin/python bench/trainer_matrix.py --steps 1 --no-write   # a quick check

Each cell runs in a fresh subprocess (bench/steploop.py, `--impl microft`): step time, tokens/s and
peak memory (peak RSS on CPU, `max_memory_allocated` on CUDA). fp16-mixed is a GPU precision (on a CPU
the trainer runs it without fast kernels, only so its grad-scaler path can be tested), so on CPU its
row is skipped and says so. Only the `## Trainer: precision × checkpointing`
section of docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from docs_section import publish
from harness import DOC, command_line, gib, load_average, machine, median, model_label, run_config, table

HEADING = "## Trainer: precision × checkpointing"
PRECISIONS = ["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]


def measure(a, device: str) -> list[dict]:
    shape = ["--impl", "microft", "--model", a.model, "--device", device, "--micro-bs", str(a.micro_bs),
             "--accum", str(a.accum), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)]
    rows = []
    for precision in PRECISIONS:
        for ckpt in (False, True):
            if precision == "fp16-mixed" and device != "cuda":
                rows.append({"precision": precision, "grad_ckpt": ckpt,
                             "skipped": "GPU precision (no fast fp16 kernels on CPU)"})
                continue
            name = f"{precision}, grad ckpt {'on' if ckpt else 'off'}"
            print(f"[matrix] {device}: {name} ...", file=sys.stderr, flush=True)
            rec = run_config(shape + ["--precision", precision] + (["--grad-ckpt"] if ckpt else []))
            rec["step_time"], rec["cpu_time"] = median(rec["step_times"]), median(rec["cpu_times"])
            rec["tokens_per_sec"] = rec["tokens_per_step"] / rec["step_time"]
            print(f"[matrix]   step {rec['step_time']:.2f} s, peak {gib(rec['peak_bytes'])}", file=sys.stderr,
                  flush=True)
            rows.append(rec)
    return rows


def section(a, rows: list[dict], device: str, started: str, load_before: str) -> str:
    ref = next(r for r in rows if r["precision"] == "fp32" and not r["grad_ckpt"])
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["precision"], "on" if r["grad_ckpt"] else "off"] + ["-"] * 6 + [r["skipped"]])
            continue
        out.append([
            r["precision"], "on" if r["grad_ckpt"] else "off", f"{r['step_time']:.2f}",
            f"{r['cpu_time']:.2f}" if device == "cpu" else "-", f"{r['tokens_per_sec']:.0f}",
            f"{ref['step_time'] / r['step_time']:.2f}×", gib(r["peak_bytes"]),
            f"{r['peak_bytes'] / ref['peak_bytes']:.2f}×", f"{r['losses'][-1]:.4f}",
        ])
    mem = ("peak allocated (`torch.cuda.max_memory_allocated`)" if device == "cuda"
           else "peak RSS of the process")
    header = ["precision", "grad ckpt", "step time (s, median)", "CPU s / step", "tokens/s", "speed vs fp32",
              "peak memory", "memory vs fp32", "loss after the last step"]
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    return (f"Command: {command_line()} ({started}). {machine(device)}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_average()}.\n\n"
            f"Shape: {model_label(a.model)}, random init; micro-batch {a.micro_bs} × seq {a.seq} × accum "
            f"{a.accum}; the same random tokens for every cell; {plural(a.warmup, 'warm-up step')}, then "
            f"{plural(a.steps, 'timed step')}. Each cell is a fresh process running the trainer's own step "
            f"functions (forward/backward, clipping, fused AdamW). Memory: {mem}. Checkpointing recomputes "
            "every block in backward (`set_grad_checkpointing`, non-reentrant).\n\n"
            f"{table(header, out)}\n\n"
            f"At micro-batch {a.micro_bs} × seq {a.seq} the fp32 weights, gradients and AdamW moments (16 "
            f"bytes per parameter: {gib(16 * ref['n_params'])}) dominate the peak, so checkpointing saves "
            "little here and costs a recomputed forward; it pays off at longer sequences and larger "
            "micro-batches (see `microft estimate-mem`). bf16-true keeps bf16 weights, gradients and AdamW "
            "moments plus 16 more bits of every fp32 master weight (`optim.MasterAdamW`): 10 bytes per "
            "parameter instead of 16, and no update lost to bf16 rounding. With "
            f"{plural(a.steps, 'timed step')} per cell and other jobs on the machine, step-time differences "
            "under about 25 % are noise: the bf16-mixed, checkpointing-off cell is the same configuration "
            "as \"microft auto\" in the speed table above.")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-write", action="store_true",
                   help="print the section instead of writing docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    a.seq = a.seq or (1024 if device == "cuda" else 256)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = load_average()
    body = section(a, measure(a, device), device, started, load_before)
    publish(DOC, HEADING, body, not a.no_write, "matrix")


if __name__ == "__main__":
    main()
