"""QLoRA on a CPU: peak RSS and tokens/s of full bf16, LoRA on bf16 and QLoRA, against transformers + peft.

    .venv/bin/python bench/qlora.py                      # the measurement: qwen3-1.7b, micro-bs 1 x seq 512
    .venv/bin/python bench/qlora.py --model qwen3-tiny --seq 64 --no-doc   # a smoke run of the script

Every training configuration runs in a fresh subprocess (`bench/steploop.py`: microft's own step functions,
or a plain transformers + peft loop), one at a time, on the same random tokens and a random init (no
download). All of them keep their weights in bf16 (`bf16-true`); QLoRA stores the block linears in NF4
and computes in bf16. bitsandbytes is tried for a transformers 4-bit row and reported when absent.

The loading benchmark writes a bf16 checkpoint of the same shape with transformers' `save_pretrained`
into a temporary directory, then loads it in a fresh process with `--quantize nf4` (quantized layer by layer
while reading) and compares the peak RSS added by loading with the NF4 model's size plus one full-precision
layer. Results go to the "## QLoRA on a CPU" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_section import replace_section  # noqa: E402
from harness import DOC, cpu_name, gib, load_average, machine, run_config, table  # noqa: E402

HEADING = "## QLoRA on a CPU"
EMULATED_COMPUTE = ("; this CPU emulates bf16, so microft multiplies the bf16 operands in fp32 and "
                    "rounds each product to bf16 once, `models.linear`")
EMULATED_NOTE = ("not run: this CPU emulates bf16, and torch's bf16 kernels, which transformers runs, reach "
                 "0.3-19 GFLOP/s here (hours per step of this shape)")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def child_save(directory: str, model: str) -> None:
    """A random bf16 checkpoint of `model`'s shape, written by transformers (what a user downloads)."""
    import torch
    import transformers

    from microft.models.config import ModelConfig

    transformers.logging.set_verbosity_error()
    raw = {k: v for k, v in ModelConfig.from_preset(model).to_hf().items() if k != "architectures"}
    hf_cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    m.to_empty(device="cpu")
    for p in m.parameters():  # random values, one tensor at a time (init is not what is measured)
        with torch.no_grad():
            p.normal_(0.0, 0.02)
    m.save_pretrained(directory, safe_serialization=True)


def child_load(directory: str, double_quant: bool) -> dict:
    """Load + quantize `directory` as `finetune --quantize nf4` does; peak RSS added, against the NF4 size."""
    import torch
    from steploop import current_rss_bytes

    # imported before the baseline: loading, not importing, is measured
    import microft.models.hf  # noqa: F401
    import microft.models.load  # noqa: F401
    from microft.models.artifacts import load_quantized
    from microft.models.quant import NF4Linear
    from microft.perf import peak_rss_bytes

    before = current_rss_bytes()
    t0 = time.perf_counter()
    model = load_quantized(directory, "nf4", double_quant, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    block0 = [m for n, m in model.named_modules() if n.startswith("h.0.") and isinstance(m, NF4Linear)]
    layer = sum(m.in_features * m.out_features * 2 for m in block0)  # block 0's linears in bf16
    largest = max(m.in_features * m.out_features * 2 for m in block0)
    return {"rss_before": before, "peak_rss": peak, "added": peak - before,
            "model_bytes": sum(storages.values()), "layer_bytes": layer, "largest_linear_bytes": largest,
            "seconds": seconds}


def run_child(args: list[str], timeout: float = 3600) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1]) if lines else {}


def training_rows(a) -> list[tuple[str, list[str] | None, str, str]]:
    """(label, steploop args or None, note, group) for each configuration; a group's ratios are taken
    against its own microft LoRA row. "plain": as configured; "smallest": every memory flag a user has
    (gradient checkpointing everywhere, double quantization for QLoRA)."""
    common = ["--model", a.model, "--micro-bs", "1", "--seq", str(a.seq), "--warmup", str(a.warmup),
              "--steps", str(a.steps), "--precision", "bf16-true"] + (["--grad-ckpt"] if a.grad_ckpt else [])
    lora = ["--lora", str(a.lora_r)]
    dq = ["--double-quant"] if a.double_quant else []
    from microft.models.precision import cpu_supports_bf16

    hf = ["--impl", "hf"] if cpu_supports_bf16() else None  # torch's emulated bf16 kernels: hours per step
    hf_note = "" if hf else EMULATED_NOTE
    rows = [("microft QLoRA (NF4 base" + (", double-quant)" if a.double_quant else ")"),
             common + lora + ["--quantize", "nf4"] + dq, "", "plain"),
            ("microft LoRA (bf16 base)", common + lora, "", "plain"),
            ("transformers + peft LoRA (bf16 base)", hf and common + lora + hf, hf_note, "plain")]
    try:
        import bitsandbytes  # noqa: F401

        rows.append(("transformers + peft + bitsandbytes QLoRA", None, "bitsandbytes is importable, but this "
                     "script does not build its 4-bit model yet", "plain"))
    except ImportError:
        rows.append(("transformers + peft + bitsandbytes QLoRA", None,
                     "not run: bitsandbytes is not installed", "plain"))
    if not a.skip_full:
        rows.append(("microft full fine-tuning (bf16-true)", common, "", "plain"))
    if not a.skip_smallest and not a.grad_ckpt:
        ck = common + ["--grad-ckpt"]
        nf4 = ["--quantize", "nf4", "--double-quant"]
        rows += [("microft QLoRA, grad ckpt, double-quant", ck + lora + nf4, "", "smallest"),
                 ("microft LoRA, grad ckpt", ck + lora, "", "smallest"),
                 ("transformers + peft LoRA, grad ckpt", hf and ck + lora + hf, hf_note, "smallest")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-1.7b")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--double-quant", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every configuration")
    p.add_argument("--skip-full", action="store_true",
                   help="leave out full fine-tuning (the largest footprint)")
    p.add_argument("--skip-load", action="store_true", help="leave out the loading benchmark")
    p.add_argument("--skip-smallest", action="store_true",
                   help="leave out the rows with gradient checkpointing (and double quantization for QLoRA)")
    p.add_argument("--no-doc", action="store_true", help="print the tables only")
    p.add_argument("--child-save", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--child-load", metavar="DIR", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_save:
        child_save(a.child_save, a.model)
        return
    if a.child_load:
        print(json.dumps(child_load(a.child_load, a.double_quant)))
        return

    from microft.models.precision import cpu_supports_bf16

    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"memory available: {gib(mem_available())}; load average {load_average()}", flush=True)
    results = []
    for label, args, note, group in training_rows(a):
        if args is None:
            results.append((label, None, note, group))
            print(f"{label}: {note}", flush=True)
            continue
        print(f"{label}: running ({gib(mem_available())} available) ...", flush=True)
        rec = run_config(args, timeout=7200)
        results.append((label, rec, note, group))
        print(f"  peak RSS {gib(rec['peak_bytes'])}, {rec['tokens_per_sec']:.1f} tokens/s", flush=True)
    loras = {g: r for lbl, r, _, g in results if lbl.startswith("microft LoRA")}
    rows = []
    for label, rec, note, group in results:
        lora = loras[group]
        if rec is None:
            rows.append([label, "-", "-", "-", "-", "-", note])
            continue
        added = rec["peak_bytes"] - rec["baseline_bytes"]
        ratio = (f"{rec['peak_bytes'] / lora['peak_bytes']:.2f}× LoRA's peak, "
                 f"{added / (lora['peak_bytes'] - lora['baseline_bytes']):.2f}× above the process")
        rows.append([label, f"{rec['trainable_params'] / 1e6:.1f}M", gib(rec["peak_bytes"]),
                     gib(rec["peak_train_bytes"]) if rec.get("peak_train_bytes") else "-", gib(added),
                     f"{rec['tokens_per_sec']:.1f}", note or ratio])
    train_table = table(["configuration", "trainable", "peak RSS", "peak RSS while training",
                         "peak above the process before the model", "tokens/s", "note"], rows)

    load_table = ""
    if not a.skip_load:
        with tempfile.TemporaryDirectory() as d:
            print("writing a bf16 checkpoint with transformers ...", flush=True)
            run_child(["--model", a.model, "--child-save", d])
            print("loading it with --quantize nf4 ...", flush=True)
            ld = run_child(["--model", a.model, "--child-load", d]
                           + (["--double-quant"] if a.double_quant else []))
        bound = ld["model_bytes"] + ld["layer_bytes"]
        load_table = table(
            ["peak RSS added by loading", "NF4 model (codes, scales, bf16 embeddings/norms)",
             "+ one bf16 block's linears", "ratio", "seconds"],
            [[gib(ld["added"]), gib(ld["model_bytes"]), gib(bound), f"{ld['added'] / bound:.2f}",
              f"{ld['seconds']:.1f}"]])

    body = "\n\n".join(x for x in [
        f"Command: `.venv/bin/python bench/qlora.py {' '.join(sys.argv[1:])}`".rstrip() + f" · {started} · "
        f"{cpu_name()} · load average at the end {load_average()}",
        f"Machine: {machine('cpu')}",
        f"`{a.model}`-shaped random model, micro-batch 1 × {a.seq} tokens, every configuration bf16-true "
        f"(QLoRA computes in bf16 from NF4 codes{EMULATED_COMPUTE if not cpu_supports_bf16() else ''}), LoRA "
        f"r={a.lora_r} on every linear of the blocks, "
        f"{'gradient checkpointing, ' if a.grad_ckpt else ''}{a.warmup} warm-up + {a.steps} timed "
        "steps, each configuration in a fresh process, its model built as the CLI builds it (bf16 weights "
        "read, here drawn, straight into bf16; transformers' with `dtype=torch.bfloat16`). Peak RSS is the "
        "process's maximum resident set (ru_maxrss), including Python and torch themselves; \"while "
        "training\" restarts the high-water mark after the model is built (Linux `clear_refs`); the next "
        "column subtracts the RSS before the model was built.",
        train_table,
        "### Loading a bf16 checkpoint with `--quantize nf4`" if load_table else "",
        load_table,
    ] if x)
    print("\n" + body)
    if not a.no_doc:
        replace_section(DOC, HEADING, body)
        print(f"\nwrote the section {HEADING!r} of {DOC}")


if __name__ == "__main__":
    main()
