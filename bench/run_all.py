"""`make bench`: every microft benchmark in one session, written into docs/benchmarks.md.

    .venv/bin/python bench/run_all.py            # ~30 minutes on a 2-core CPU
    .venv/bin/python bench/run_all.py --quick    # one round of speed runs, sections printed, doc untouched

Runs bench/speed.py (microft vs transformers; the same CPU runs again as an emulated AVX2-only CPU
where this one has native bf16; its GPU part only when CUDA is available), bench/paired.py (microft
and transformers stepping in turn in one process: the ratio on a host whose speed drifts),
bench/trainer_matrix.py (precision × gradient checkpointing) and bench/families.py (a Qwen3-0.6B shape
against transformers, and loading a 1B checkpoint). Each rewrites only its own section. bench/qlora.py,
bench/packing.py, bench/linear_kernels.py, bench/memory_accuracy.py, bench/dpo.py and bench/gemma3.py (a Gemma
3 1B LoRA step against transformers + PEFT, ~7 GiB a process) run on their own (they need more memory or
time).
"""

from __future__ import annotations

import argparse
import sys
import time

import families
import paired
import speed
import trainer_matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one round of the speed runs; print instead of writing the doc")
    p.add_argument("--only", choices=["speed", "paired", "matrix", "families"],
                   help="run one of the benchmarks")
    a = p.parse_args()
    t0 = time.perf_counter()
    if a.only in (None, "speed"):
        nums = speed.main(["--emulate-avx2"] + (["--rounds", "1", "--no-write"] if a.quick else []))
        lean, ck = nums["memory_ratio_bf16_true"], nums["memory_ratio_bf16_true_ckpt"]
        print(f"[run_all] speed: microft {nums['speedup']:.2f}× transformers' tokens/s "
              f"({nums['cpu_speedup']:.2f}× on CPU time), MFU {100 * nums['mfu']:.0f} % of the "
              f"{nums['peak_dtype']} probe {nums['peak_flops'] / 1e9:.0f} GFLOP/s, "
              f"peak memory {nums['memory_ratio']:.2f}×"
              + (f" (bf16-true {lean:.2f}×, + grad ckpt {ck:.2f}×)" if lean is not None else ""),
              file=sys.stderr)
        if "avx2" in nums:
            print(f"[run_all] speed, emulated AVX2-only CPU (fp32): microft {nums['avx2']['speedup']:.2f}× "
                  f"transformers' tokens/s ({nums['avx2']['cpu_speedup']:.2f}× on CPU time)",
                  file=sys.stderr)
    if a.only in (None, "paired"):
        quick = ["--pairs", "4", "--avx2-pairs", "2", "--no-write"] if a.quick else []
        pair = paired.main(["--emulate-avx2", *quick])
        print(f"[run_all] paired: microft {pair['pair_ratio']:.2f}× transformers' tokens/s (median of "
              f"the pairs' ratios, one process)", file=sys.stderr)
    if a.only in (None, "matrix"):
        trainer_matrix.main(["--no-write"] if a.quick else [])
    if a.only in (None, "families"):
        fam = families.main(["--no-write", "--steps", "1", "--skip-load"] if a.quick else [])
        print(f"[run_all] families: microft {fam['speedup']:.2f}× transformers' tokens/s on the "
              f"Qwen3-0.6B shape, peak memory {fam['memory_ratio']:.2f}×", file=sys.stderr)
    print(f"[run_all] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
