r"""One benchmark configuration in this process: build a model (any preset), train a few steps, print JSON.

    .venv/bin/python bench/steploop.py --impl microft --precision auto --steps 3
    .venv/bin/python bench/steploop.py --impl hf --precision bf16-mixed --steps 3 --profile 30
    .venv/bin/python bench/steploop.py --threads 1 --no-mallopt --steps 3   # A/B of keep_freed_memory()
    .venv/bin/python bench/steploop.py --model qwen3-1.7b --precision bf16-true --lora 16 --quantize nf4 \
        --seq 512

`bench/harness.py` runs every configuration in a fresh subprocess, so each peak RSS belongs to
one configuration alone. `--impl microft` composes the trainer's own step functions
(`micro_step`, `clip_gradients`, `optimizer_step`) exactly as `train()` does; `--impl hf` is a
plain training loop over transformers' model of the same family (`AutoModelForCausalLM`; its built-in loss,
`loss.backward()`, `clip_grad_norm_`, torch AdamW). Both see the same random tokens, random init, no download.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microft.config import RunConfig  # noqa: E402
from microft.models.config import ModelConfig
from microft.perf import peak_rss_bytes  # noqa: E402

LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-4, (0.9, 0.95), 0.1, 1.0


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def make_tokens(steps: int, micro_bs: int, accum: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(steps, accum, micro_bs, seq + 1) random token ids: the same data for every configuration."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, accum, micro_bs, seq + 1), generator=g)


def hwm_bytes() -> int | None:
    """The process's resident high-water mark (Linux VmHWM), or None elsewhere."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return None


def reset_hwm() -> bool:
    """Restart VmHWM from the current RSS (Linux: `5` to /proc/self/clear_refs); False where that fails."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiler_activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "cuda_max_allocated"}
    return {"peak_bytes": peak_rss_bytes(), "peak_kind": "peak_rss"}


def microft_stepper(cfg: ModelConfig, args, device: torch.device):
    """(model, step(tokens) -> loss, resolved precision) built from microft's own trainer pieces."""
    from microft.models.transformer import set_grad_checkpointing
    from microft.train.loop import keep_freed_memory
    from microft.train.optim import build_optimizer
    from microft.train.step import (
        autocast_context,
        clip_gradients,
        make_scaler,
        micro_step,
        optimizer_step,
        resolve_precision,
    )

    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    # QLoRA: the block linears quantized to NF4 one layer at a time while building (runs.load_base)
    if args.quantize:
        from microft.models.artifacts import load_quantized

        dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        model = load_quantized(args.model, args.quantize, args.double_quant, dtype=dtype, seed=0)
    else:  # as the CLI loads it: bf16-true weights read (here: drawn) in bf16, one tensor at a time
        from microft.models.load import load_model

        model = load_model(args.model, dtype=torch.bfloat16 if precision == "bf16-true" else torch.float32)
    if device.type == "cpu" and not args.no_mallopt:
        keep_freed_memory()  # as train() does
    if precision == "bf16-true":
        model.to(dtype=torch.bfloat16)
    if args.lora:
        from microft.models.lora import apply_lora

        apply_lora(model, args.lora, 2.0 * args.lora, 0.0, args.lora_targets)
    model.to(device).train()
    if args.grad_ckpt:
        set_grad_checkpointing(model, True)
    runner = torch.compile(model) if args.compile else model
    run_cfg = RunConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
                        max_grad_norm=MAX_GRAD_NORM, precision=precision)
    optimizer = build_optimizer(model, run_cfg, device)
    autocast, scaler = autocast_context(precision, device), make_scaler(precision, device)

    def step(tokens: torch.Tensor) -> float:
        denom = float(tokens[:, :, 1:].numel())  # every token is a target
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for mb in tokens:
            x, y = mb[:, :-1].to(device, non_blocking=True), mb[:, 1:].to(device, non_blocking=True)
            loss_sum += micro_step(runner, x, y, None, denom, autocast, scaler)
        scaler.unscale_(optimizer)
        clip_gradients(model, MAX_GRAD_NORM, None if scaler.is_enabled() else optimizer)
        loss = float(loss_sum) / denom  # the trainer's one host sync per step
        optimizer_step(optimizer, scaler)
        return loss

    return model, step, precision


def hf_stepper(cfg: ModelConfig, args, device: torch.device):
    """(model, step(tokens) -> loss, precision): the loop a transformers user writes by hand."""
    import transformers

    transformers.logging.set_verbosity_error()
    raw = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    hf_cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    # built in it, as from_pretrained(dtype=)
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    model.to(device).train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.quantize:
        raise SystemExit("--impl hf --quantize needs bitsandbytes' 4-bit layers; run it where they are "
                         "installed")
    if args.lora:  # peft's LoRA on every linear of the blocks, as microft's --lora-targets all
        import peft

        if args.grad_ckpt:
            model.enable_input_require_grads()
        lcfg = peft.LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lcfg)
    runner = torch.compile(model) if args.compile else model
    embedding = ("wte", "wpe", "embed_tokens")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not any(e in n for e in embedding)]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and not any(e in n for e in embedding))]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    impl = {"fused": True} if args.hf_optim == "fused" else {}
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8, **impl)
    precision = args.precision if args.precision != "auto" else "fp32"
    if precision == "bf16-mixed":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    elif precision in ("fp32", "bf16-true"):  # bf16-true: bf16 weights, plain torch AdamW on them
        autocast = contextlib.nullcontext
    else:
        raise SystemExit(f"--impl hf supports fp32, bf16-mixed and bf16-true, not {precision}")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(tokens: torch.Tensor) -> float:
        total = torch.zeros((), device=device)
        for mb in tokens:
            x = mb[:, :-1].to(device, non_blocking=True)  # HF shifts labels inside its loss
            with autocast():
                loss = runner(input_ids=x, labels=x).loss / len(tokens)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return model, step, precision


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::_weight_int8pack_mm",
              "mkldnn::_linear_pointwise"}
ATTENTION_MATMULS = {"aten::bmm", "aten::baddbmm"}  # only attention multiplies batches of matrices here


def breakdown(prof) -> dict[str, float]:
    """Seconds of the profiled step by kind of op (self time, so nothing is counted twice)."""
    out = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    for e in prof.key_averages():
        own = e.self_device_time_total if getattr(e, "self_device_time_total", 0) else e.self_cpu_time_total
        t = own / 1e6
        if e.key in MATMUL_OPS or "gemm" in e.key.lower():
            out["matmul"] += t
        elif "scaled_dot_product" in e.key or "flash" in e.key.lower() or e.key in ATTENTION_MATMULS:
            out["attention"] += t
        elif "adam" in e.key.lower():
            out["optimizer"] += t
        else:
            out["other"] += t
    return out


def print_profile(prof, rows: int) -> None:
    """The `rows` most expensive ops by self time (device time on CUDA), to stderr."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"{'op':60s} {'self ms':>9s} {'%':>5s} {'calls':>6s}", file=sys.stderr)
    for e in events[:rows]:
        print(f"{e.key[:60]:60s} {e.self_cpu_time_total / 1e3:9.1f} "
              f"{100 * e.self_cpu_time_total / total:5.1f} {e.count:6d}", file=sys.stderr)
    print(f"{'total':60s} {total / 1e3:9.1f}", file=sys.stderr)


def run(args) -> dict:
    """Build, warm up, time `args.steps` optimizer steps; return the record."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.model)
    rss_before = current_rss_bytes()
    tokens = make_tokens(args.warmup + args.steps, args.micro_bs, args.accum, args.seq, cfg.vocab_size)
    build = microft_stepper if args.impl == "microft" else hf_stepper
    model, step, precision = build(cfg, args, device)
    peak_build = hwm_bytes()  # building (and, for QLoRA, quantizing) the model
    train_peak_known = reset_hwm()
    reset_peak(device)
    losses, times, cpu_times = [], [], []
    for i in range(args.warmup + args.steps):
        prof = None
        if args.profile and i == args.warmup:
            prof = torch.profiler.profile(activities=profiler_activities(device))
            prof.__enter__()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(tokens[i]))
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if prof is not None:
            prof.__exit__(None, None, None)
            print_profile(prof, args.profile)
    peak = peak_memory(device)  # before the profiled step: the profiler's own records are not the model's
    peak_train = hwm_bytes() if train_peak_known else None  # training steps only (build excluded)
    split = None
    if args.breakdown:  # one more step, under the profiler, after the timed ones
        with torch.profiler.profile(activities=profiler_activities(device)) as prof:
            step(tokens[-1])
            sync(device)
        split = breakdown(prof)
    tokens_per_step = args.micro_bs * args.accum * args.seq
    median = statistics.median(times)
    return {
        "impl": args.impl, "precision": precision, "grad_ckpt": args.grad_ckpt, "compile": args.compile,
        "hf_optim": args.hf_optim if args.impl == "hf" else "fused", "model": args.model,
        "device": str(device), "micro_bs": args.micro_bs, "accum": args.accum, "seq": args.seq,
        "warmup": args.warmup, "steps": args.steps, "tokens_per_step": tokens_per_step,
        "n_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "lora": args.lora,
        "quantize": args.quantize, "double_quant": args.double_quant, "step_times": times,
        "step_time": median, "cpu_times": cpu_times, "tokens_per_sec": tokens_per_step / median,
        "losses": losses, "threads": torch.get_num_threads(), "rss_before_model": rss_before,
        "baseline_bytes": rss_before if device.type == "cpu" else 0, "breakdown": split,
        "peak_build_bytes": peak_build, "peak_train_bytes": peak_train, **peak,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["microft", "hf"], default="microft")
    p.add_argument("--precision", default="auto", help="microft: auto|fp32|bf16-mixed|fp16-mixed|bf16-true")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--hf-optim", choices=["fused", "default"], default="fused")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="LoRA rank (0: full fine-tuning); hf: peft")
    p.add_argument("--lora-targets", default="all", help="microft: which block linears get adapters")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="microft: NF4 base (QLoRA; with --lora)")
    p.add_argument("--double-quant", action="store_true",
                   help="microft: with --quantize, quantize the scales too")
    p.add_argument("--no-mallopt", action="store_true", help="microft: skip trainer.keep_freed_memory()")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--breakdown", action="store_true",
                   help="profile one extra step: time in matmul/attention/...")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print a profiler table of the first timed step")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse())))
