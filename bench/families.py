"""The modern families against transformers: a training step on a Qwen3-0.6B shape, and loading a 1B model.

    .venv/bin/python bench/families.py                 # both parts; rewrites its docs/benchmarks.md section
    .venv/bin/python bench/families.py --no-write --steps 2 --skip-load   # a quick check, printed only

Speed: `qwen3-0.6b` (random init, real shape), micro-batch 2 × seq 256. microft runs its default
precision (`auto`) with its own trainer step functions; transformers runs the plain loop a user
writes (`AutoModelForCausalLM`, built-in loss, fused AdamW) in fp32 and, where the CPU has native
bf16, in bf16 autocast: the faster one is the peer. Each configuration is a fresh subprocess
(bench/steploop.py), so its peak RSS is its own.

Loading: a `llama-3.2-1b`-shaped checkpoint is written once in bf16 as transformers' sharded
safetensors; a fresh process then loads it with `microft.models.load.load_model(dtype=None)` and
reports how far its RSS rose above the baseline, against the size of the weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_section import replace_section
from harness import DOC, ROOT, command_line, gib, load_average, machine, median, run_config, table

HEADING = "## Model families vs transformers"
TARGET_SPEEDUP, TARGET_LOAD_RATIO = 1.3, 1.25

LOAD_CHILD = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from microft.models.load import load_model
from microft.perf import peak_rss_bytes
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
t = time.perf_counter()
model = load_model(sys.argv[1], dtype=None)
secs = time.perf_counter() - t
with torch.no_grad():  # touch every page: weights mapped from the file but never read would not count
    for p in model.parameters():
        p.view(-1)[::512].sum()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weights": weights, "rise": peak_rss_bytes() - base, "seconds": secs}))
"""

WRITE_CHILD = r"""
import sys, torch, transformers
sys.path.insert(0, sys.argv[2])
from microft.models.config import ModelConfig
raw = {k: v for k, v in ModelConfig.from_preset(sys.argv[3]).to_hf().items() if k != "architectures"}
cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
"""


def speed_runs(a) -> dict[str, dict]:
    from microft.train.step import cpu_supports_bf16

    shape = ["--model", a.model, "--micro-bs", str(a.micro_bs), "--seq", str(a.seq),
             "--warmup", str(a.warmup), "--steps", str(a.steps)]
    runs = {"microft auto": ["--impl", "microft", "--precision", "auto"],
            "transformers fp32": ["--impl", "hf", "--precision", "fp32"]}
    if cpu_supports_bf16():  # emulated bf16 is no candidate: it is many times slower than fp32
        runs["transformers bf16"] = ["--impl", "hf", "--precision", "bf16-mixed"]
    out = {}
    for name, extra in runs.items():
        print(f"[families] {name} ...", file=sys.stderr, flush=True)
        rec = run_config(shape + extra, timeout=3600)
        rec["tokens_per_sec"] = rec["tokens_per_step"] / median(rec["step_times"])
        print(f"[families]   {rec['tokens_per_sec']:.0f} tokens/s, peak {gib(rec['peak_bytes'])}",
              file=sys.stderr, flush=True)
        out[name] = rec
    return out


def load_run(preset: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="microft-bench-load-") as tmp:
        print(f"[families] writing a {preset}-shaped bf16 checkpoint ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", WRITE_CHILD, tmp, str(ROOT), preset], check=True)
        files = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        print("[families] loading it in a fresh process ...", file=sys.stderr, flush=True)
        res = subprocess.run([sys.executable, "-c", LOAD_CHILD, tmp, str(ROOT)], check=True,
                             capture_output=True, text=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec["files"] = files
        return rec


def section(a, runs: dict[str, dict], load: dict | None, started: str, load_before: str) -> tuple[str, dict]:
    mf = runs["microft auto"]
    peers = {k: v for k, v in runs.items() if k.startswith("transformers")}
    best = max(peers, key=lambda k: peers[k]["tokens_per_sec"])
    speedup = mf["tokens_per_sec"] / peers[best]["tokens_per_sec"]
    mem = mf["peak_bytes"] / peers[best]["peak_bytes"]
    rows = [[f"**{k}**" if k.startswith("microft") else k, r["precision"], f"{median(r['step_times']):.2f}",
             f"{r['tokens_per_sec']:.0f}", gib(r["peak_bytes"])] for k, r in runs.items()]
    text = [f"Command: {command_line()} ({started}). {machine('cpu')}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_average()}.", "",
            f"Shape: `{a.model}` (random init, real shape), micro-batch {a.micro_bs} × seq {a.seq}, "
            f"{a.warmup} warm-up and {a.steps} timed steps per run, each run a fresh process (peak "
            "RSS of the whole process). One step = forward, backward, clipping at 1.0, AdamW.", "",
            table(["run", "precision", "s / step", "tokens/s", "peak RSS"], rows), "",
            f"- microft `auto` vs transformers' faster run ({best}): **{speedup:.2f}×** its tokens/s "
            f"(target ≥ {TARGET_SPEEDUP}×), **{mem:.2f}×** its peak memory (target ≤ 1×)."]
    nums = {"speedup": speedup, "memory_ratio": mem}
    if load:
        ratio = load["rise"] / load["weights"]
        text.append(f"- Loading a `{a.load_model}`-shaped bf16 checkpoint ({gib(load['files'])} of sharded "
                    f"safetensors) with `load_model`: RSS rose {gib(load['rise'])} for "
                    f"{gib(load['weights'])} of weights, **{ratio:.2f}×** (target ≤ "
                    f"{TARGET_LOAD_RATIO}×), in {load['seconds']:.1f} s.")
        nums["load_ratio"] = ratio
    return "\n".join(text) + "\n", nums


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--micro-bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--load-model", default="llama-3.2-1b")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the section instead of rewriting the doc")
    a = p.parse_args(argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = load_average()
    runs = speed_runs(a)
    load = None if a.skip_load else load_run(a.load_model)
    text, nums = section(a, runs, load, started, load_before)
    if a.no_write:
        print(text)
    else:
        replace_section(DOC, HEADING, text)
        print(f"[families] wrote {HEADING!r} in {DOC}", file=sys.stderr)
    return nums


if __name__ == "__main__":
    main()
