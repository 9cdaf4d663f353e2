"""GGUF export: time and peak memory for a Qwen2.5-0.5B shape; llama.cpp's logits against microft's per type.

    python bench/gguf_export.py            (prints a docs/benchmarks.md section)

1. A random-init qwen2.5-0.5b checkpoint (microft format, fp32) with a small Qwen-style tokenizer is written
   once; `microft export --format gguf` then runs in a fresh process per --quant, timed, its peak RSS read
   from the kernel (ru_maxrss of the child).
2. With llama-cpp-python installed: the tiny models of tests/ggufdirs.py exported per type, and the largest
   difference between llama.cpp's logits and microft's on a fixed prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from microft.perf import cpu_model  # noqa: E402
from tests.ggufdirs import rounded_model, write_family_dir, write_tokenizer  # noqa: E402

SHAPE = "qwen2.5-0.5b"
QUANTS = ("f16", "q8_0")


def big_checkpoint(d: Path) -> Path:
    from microft.models.load import load_model, save_model

    torch.manual_seed(0)
    save_model(d, load_model(SHAPE))
    write_tokenizer(d, "qwen2")
    return d


def timed_export(src: Path, out: Path, quant: str) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, file bytes) of one `microft export --format gguf` in its own process."""
    cmd = [
        str(Path(sys.executable).parent / "microft"),
        "export",
        "--model",
        str(src),
        "--out",
        str(out),
        "--format",
        "gguf",
        "--quant",
        quant,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident set
    secs = time.perf_counter() - t0
    if status:
        raise SystemExit(f"export failed: {proc.stderr.read().decode()}")
    return secs, usage.ru_maxrss * 1024, next(out.glob("*.gguf")).stat().st_size


def logit_errors(work: Path) -> list[tuple[str, str, float, float | None, float]]:
    """(family, type, max |difference| to microft, to microft on the same rounded weights, max |logit|)."""
    try:
        import llama_cpp
    except ImportError:
        return []
    from microft.data.tokenizer_files import tokenizer_for
    from microft.export.gguf import export_gguf
    from microft.models.artifacts import load_any

    rows = []
    for name in ("gpt2", "llama", "qwen3", "mistral"):
        d = write_family_dir(work / name, name)
        model = load_any(str(d)).eval()
        tok = tokenizer_for(str(d), model.config)
        ids = tok.prefix + tok.encode("Hello world, how are you? 1234 héllo")
        with torch.no_grad():
            want = model(torch.tensor([ids])).double()[0].numpy()
        for quant in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            res = export_gguf(model, tok, work / f"{name}-{quant}", quant, name=name)
            kv = {"type_k": 0, "type_v": 0} if quant == "f32" else {}  # f32 KV cache for the f32 file
            llm = llama_cpp.Llama(
                model_path=str(res.path), n_ctx=64, n_threads=1, logits_all=True, verbose=False, **kv
            )
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float64)
            same = None
            if quant in ("bf16", "q8_0", "q4_0"):
                with torch.no_grad():
                    ref = rounded_model(d, res.path).eval()(torch.tensor([ids])).double()[0].numpy()
                same = float(np.abs(got - ref).max())
            rows.append((name, quant, float(np.abs(got - want).max()), same, float(np.abs(want).max())))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="microft-gguf-bench-") as tmp:
        work = Path(tmp)
        src = big_checkpoint(work / "ckpt")
        runs = [(q, *timed_export(src, work / f"out-{q}", q)) for q in QUANTS]
        errors = logit_errors(work / "tiny")
    day, cpu, threads = date.today().isoformat(), cpu_model(), torch.get_num_threads()
    print(f"## GGUF export\n\nCommand: `python bench/gguf_export.py` ({day}, {cpu}, {threads} torch threads, "
          f"torch {torch.__version__}).\n")
    print(f"A random-init `{SHAPE}` checkpoint (494 M parameters, fp32 on disk) exported by `microft export "
          "--format gguf --quant Q` in a fresh process; peak RSS is the process's maximum resident set. "
          "The fp32 model is held once; each tensor is converted and written on its own.\n")
    print("| --quant | time | peak RSS | file |\n|---|---|---|---|")
    for q, secs, rss, size in runs:
        print(f"| {q} | {secs:.1f} s | {rss / 2**30:.2f} GiB | {size / 2**30:.2f} GiB |")
    if not errors:
        return
    print("\nllama.cpp (llama-cpp-python 0.3.36) against microft: the largest |logit difference| on a "
          "fixed prompt, tiny random models of tests/ggufdirs.py (final norm scaled so the logits spread "
          "widely; the largest |logit| is given for scale). f32 with an f32 KV cache, the others with "
          "llama.cpp's default f16 cache. For the rounded types also against microft running the same "
          "rounded weights (decoded from the file's blocks): what is left is llama.cpp rounding the "
          "activations of those matmuls.\n")
    print("| family | type | vs microft | vs microft, same rounded weights | max logit |")
    print("|---|---|---|---|---|")
    for name, quant, err, same, scale in errors:
        same_text = "-" if same is None else f"{same:.4f}"
        print(f"| {name} | {quant} | {err:.4f} | {same_text} | {scale:.1f} |")

if __name__ == "__main__":
    main()
