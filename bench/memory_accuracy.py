"""Memory estimate accuracy on real shapes of every family: analytical vs traced peak.

Shapes: GPT-2 124M/355M, SmolLM2, Qwen2.5, Qwen3, Llama 3.2.

    .venv/bin/python bench/memory_accuracy.py            # writes the table into docs/benchmarks.md
    .venv/bin/python bench/memory_accuracy.py --cuda     # also measures torch.cuda.max_memory_allocated

For each configuration the analytical engine (`microft.memory.estimate`) and the trace engine
(`microft.memory.trace`: microft's real training step, two optimizer steps on fake tensors) give
the peak of live tensor bytes; the table shows both and their difference. With `--cuda` the same
step runs for real (random tokens, same number of steps) and `max_memory_allocated` is compared
with the trace plus the cuBLAS workspace, which the caching allocator also counts.

Only the `## Memory estimate accuracy` section of docs/benchmarks.md is (re)written.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from docs_section import replace_section  # noqa: E402

from microft.config import RunConfig  # noqa: E402
from microft.memory.estimate import estimate, load_shape, setup_for, trace  # noqa: E402

HEADING = "## Memory estimate accuracy"
# (model, micro-batch, seq len, precision, other RunConfig fields, accumulation)
CONFIGS = [
    ("gpt2", 8, 1024, "fp32", {}, 1),
    ("gpt2", 8, 1024, "bf16-mixed", {}, 1),
    ("gpt2", 8, 1024, "bf16-mixed", {"grad_ckpt": True}, 1),
    ("gpt2", 4, 1024, "fp16-mixed", {}, 2),
    ("gpt2", 8, 1024, "bf16-true", {}, 1),
    ("gpt2", 8, 1024, "bf16-mixed", {"lora": True, "lora_r": 16}, 1),
    ("gpt2", 4, 512, "fp32", {"optimizer": "sgd"}, 1),
    ("gpt2", 16, 1024, "bf16-mixed", {"grad_ckpt": True, "optimizer": "adamw-8bit"}, 1),
    ("gpt2-medium", 4, 1024, "fp32", {}, 1),
    ("gpt2-medium", 4, 1024, "bf16-mixed", {}, 1),
    ("gpt2-medium", 8, 1024, "bf16-mixed", {"grad_ckpt": True}, 1),
    ("gpt2-medium", 8, 1024, "bf16-mixed", {"lora": True, "lora_r": 16}, 1),
    ("gpt2-medium", 16, 1024, "bf16-mixed", {"lora": True, "lora_r": 16, "grad_ckpt": True}, 1),
    ("gpt2-medium", 4, 1024, "bf16-mixed", {"optimizer": "adafactor"}, 2),
    # the other families at their real shapes (the trace runs on fake tensors: no memory, a few seconds)
    ("smollm2-135m", 4, 1024, "bf16-mixed", {}, 1),
    ("smollm2-135m", 8, 1024, "bf16-mixed", {"grad_ckpt": True}, 1),
    ("qwen2.5-0.5b", 2, 1024, "bf16-mixed", {}, 1),
    ("qwen2.5-0.5b", 4, 1024, "bf16-mixed", {"lora": True, "lora_r": 16}, 1),
    ("qwen3-0.6b", 2, 1024, "bf16-mixed", {}, 1),
    ("qwen3-0.6b", 4, 1024, "bf16-mixed", {"grad_ckpt": True}, 1),
    ("llama-3.2-1b", 1, 1024, "bf16-mixed", {"lora": True, "lora_r": 16, "grad_ckpt": True}, 1),
]


def switches(kw: dict) -> str:
    out = []
    if kw.get("grad_ckpt"):
        out.append("grad ckpt")
    if kw.get("optimizer"):
        out.append(kw["optimizer"])
    if kw.get("lora"):
        out.append(f"LoRA r={kw.get('lora_r', 8)}")
    return ", ".join(out) or "-"


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def cuda_peak(model: str, cfg: RunConfig, micro_bs: int, seq: int, accum: int, precision: str,
              device_name: str = "cuda") -> int:
    """max_memory_allocated over two real optimizer steps of microft's step on the GPU
    (on "cpu" the same steps run, as a smoke test, and 0 is returned)."""
    import torch

    from microft.models.load import load_model
    from microft.models.transformer import set_grad_checkpointing
    from microft.train.optim import build_optimizer
    from microft.train.step import autocast_context, finish_step, make_scaler, micro_step

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    m = load_model(model, dropout=cfg.dropout)
    if cfg.lora:
        from microft.models.lora import apply_lora

        apply_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if precision == "bf16-true":
        m.to(dtype=torch.bfloat16)
    m.to(device).train()
    if cfg.grad_ckpt:
        set_grad_checkpointing(m, True, cfg.grad_ckpt_every)
    opt = build_optimizer(m, cfg, device)
    scaler, autocast = make_scaler(precision, device), autocast_context(precision, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        for _ in range(accum):
            x = torch.randint(0, m.config.vocab_size, (micro_bs, seq), device=device)
            micro_step(m, x, x.clone(), None, float(micro_bs * seq * accum), autocast, scaler)
        finish_step(m, opt, scaler, cfg.max_grad_norm)  # as train() does
    if not cuda:
        return 0
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del m, opt
    return peak


def run(cuda: bool) -> tuple[list[str], float]:
    rows, worst = [], 0.0
    for model, mb, seq, prec, kw, acc in CONFIGS:
        cfg = RunConfig(precision=prec, max_seq_len=seq, **kw)
        arch = load_shape(model, cfg.dropout)
        s = setup_for(cfg, arch, mb, accum=acc)
        t0 = time.perf_counter()
        a = estimate(arch, s)
        ta = time.perf_counter() - t0
        t = trace(arch, s, max_grad_norm=cfg.max_grad_norm)
        err = (a.peak_bytes - t.peak_bytes) / t.peak_bytes
        worst = max(worst, abs(err))
        row = (f"| {model} | {mb} × {seq} | {acc} | {prec} | {switches(kw)} | {gib(a.peak_bytes)} | "
               f"{gib(t.peak_bytes)} | {a.peak_bytes - t.peak_bytes:+,} B ({100 * err:+.4f} %) | "
               f"{t.peak_phase} | {1000 * ta:.0f} ms | {t.seconds:.1f} s |")
        if cuda:
            import torch

            from microft.errors import MicroftError
            from microft.memory.estimate import Budget, runtime_overhead

            try:
                measured = cuda_peak(model, cfg, mb, seq, acc, prec)
            except (MicroftError, torch.OutOfMemoryError) as e:  # adamw-8bit without bitsandbytes, OOM
                row += f" n/a ({str(e).splitlines()[0][:60]}) | - |"
            else:
                hopper = torch.cuda.get_device_capability()[0] >= 9
                ws = runtime_overhead(0, Budget(1, "gpu", hopper=hopper))["cuBLAS workspace"]
                row += f" {gib(measured)} | {100 * (t.peak_bytes + ws - measured) / measured:+.2f} % |"
        rows.append(row)
        print(row, flush=True)
    return rows, worst


def write_section(rows: list[str], worst: float, cuda: bool, argv: list[str]) -> Path:
    import torch

    head = ("| model | micro-bs × seq | accum | precision | switches | analytical | traced | difference | "
            "peak phase | analytical time | trace time |")
    sep = "|" + "---|" * 11
    if cuda:
        head += " CUDA max allocated | trace + cuBLAS vs CUDA |"
        sep += "---|---|"
    cmd = " ".join(["python bench/memory_accuracy.py", *argv])
    body = "\n".join([
        f"Command: `{cmd}` (torch {torch.__version__}, {platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}). Peak of live tensor bytes over two optimizer steps of microft's "
        "training step (CUDA's 512-byte rounding included, runtime overhead excluded): the analytical "
        "replay against the trace of the real step on fake tensors. Largest difference: "
        f"{100 * worst:.4f} %.",
        "", head, sep, *rows,
    ])
    return replace_section(ROOT / "docs" / "benchmarks.md", HEADING, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true", help="also measure max_memory_allocated on the GPU")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows, worst = run(args.cuda)
    if not args.no_write:
        argv = ["--cuda"] if args.cuda else []
        print(f"wrote {write_section(rows, worst, args.cuda, argv)}")


if __name__ == "__main__":
    main()
