"""Throughput and memory measurements: FLOPs per token, device peaks, MFU, process memory."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from microft.models.config import ModelConfig
from microft.models.linear import bf16_products_in_fp32, onednn_runs
from microft.models.precision import ONEDNN_ISA_ENVS
from microft.resolved import PrecisionPolicy, precision_policy

# dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s; fp32 uses TF32 peak where it applies
GPU_PEAK_TFLOPS: dict[str, float] = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0, "a10": 125.0,
    "rtx 4090": 165.0, "rtx 3090": 71.0, "rtx 3080": 59.5, "t4": 65.0, "v100": 125.0,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token (see `ModelConfig.flops_per_token`: one formula for every family)."""
    return cfg.flops_per_token(seq_len, trainable_fraction)


PROBE_SHAPES = {"cpu": (1024, 2048, 3072), "cuda": (4096, 8192)}
# 2: the best of several matmul engines; 3: the best of short bursts, F.linear's layout for half dtypes, the
# kernels' instruction set in the key. A cached figure from another probe is not reused
PROBE_VERSION = 3
KERNEL_ISA_ENVS = (*ONEDNN_ISA_ENVS, "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE")
PROBE_BURSTS = 5  # timed bursts per shape and engine, after one that warms up: the best burst counts


def _probe_key(device_type: str, dtype_name: str, threads: int | None = None) -> str:
    if device_type == "cuda":
        where = torch.cuda.get_device_name()
    elif device_type == "mps":
        where = f"mps|{cpu_model()}"
    else:  # the instruction sets the kernels may use: the variables that hold them below the CPU's own
        held = "".join(f" {k}={os.environ[k]}" for k in KERNEL_ISA_ENVS if os.environ.get(k))
        where = (f"{cpu_model()}|{threads or torch.get_num_threads()} threads|"
                 f"{torch.backends.cpu.get_cpu_capability()}{held}")
    return f"{where}|torch {torch.__version__}|{dtype_name}|probe {PROBE_VERSION}"


def probe_engines(device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The matmul engines the probe times. torch's `@` everywhere; on a CPU also, in bf16/fp16, torch's
    `F.linear` (a linear's layout, `x @ W.T`: emulated there, it ran 20x faster than a plain `@` held to
    AVX2), oneDNN's linear (what microft's fp32 forwards run) where it runs `dtype` (held to AVX2 it has no
    bf16 or fp16 linear) and, in fp32, numpy's BLAS (OpenBLAS in numpy's wheels): on an AVX2 EPYC the three
    differed by up to 1.3x on the same 2048² product, and the peak is the hardware's best, not one library's.
    """
    if device_type != "cpu":
        return ("torch",)
    engines = ["torch"]
    if dtype != torch.float32:
        engines.append("linear")
    if onednn_runs(dtype):
        engines.append("onednn")
    if dtype == torch.float32:
        engines.append("numpy")
    return tuple(engines)


def _matmul(engine: str, a: torch.Tensor, b: torch.Tensor):
    """A zero-argument a @ b through `engine`, its operands and output prepared outside the timed call."""
    if engine == "onednn":
        bt = b.t().contiguous()  # oneDNN's linear takes the (out, in) weight: x @ bt.T = a @ b
        return lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [None], "")
    if engine == "linear":
        bt = b.t().contiguous()
        return lambda: torch.nn.functional.linear(a, bt)
    if engine == "numpy":
        import numpy as np

        an, bn = a.numpy(), b.numpy()
        out = np.empty((an.shape[0], bn.shape[1]), dtype=an.dtype)
        return lambda: np.matmul(an, bn, out=out)
    return lambda: a @ b


def _sustained_rate(n: int, dtype: torch.dtype, device_type: str, seconds: float,
                    engine: str = "torch") -> float:
    """FLOP/s of back-to-back n×n matmuls through `engine`: the best of PROBE_BURSTS short timed bursts
    after one that warms caches, threads and clocks, about `seconds` in all (at least one matmul a burst,
    two bursts).

    The best short burst, not one long average: other jobs' load lowers an average, while a burst that ran
    in a quiet moment measures the hardware (a peak probed on a busy machine read half a later one).
    """
    a = torch.randn(n, n, device=device_type).to(dtype)
    b = torch.randn(n, n, device=device_type).to(dtype)
    mm = _matmul(engine, a, b)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device_type, lambda: None)
    every = 1 if device_type == "cpu" else 4  # a CPU matmul is synchronous: check the clock after each one
    burst = seconds / (PROBE_BURSTS + 1)
    best, bursts, start = 0.0, 0, time.perf_counter()
    while bursts <= PROBE_BURSTS and (bursts < 2 or time.perf_counter() - start < seconds):
        iters, t0 = 0, time.perf_counter()
        while True:
            mm()
            iters += 1
            if iters % every == 0:
                sync()
                if time.perf_counter() - t0 >= burst:
                    break
        sync()
        if bursts:  # the first burst warms up
            best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
        bursts += 1
    return best


_PEAKS: dict[str, float] = {}  # this process's peaks, by probe key (the cache file is read once per key)


def measured_peak_flops(device_type: str, dtype_name: str, seconds: float = 9.0,
                        at_least: float = 0.0) -> float:
    """The best sustained matmul rate (FLOP/s) on this device in this dtype: the peak MFU divides by.

    Large square matmuls (PROBE_SHAPES) through each engine of `probe_engines`, each warmed up and
    then run in short bursts for a share of `seconds`; the best rate counts. The figure is cached per
    process and, keyed by the device, thread count, torch version, dtype and probe version, in
    `~/.cache/microft/peak-flops.json`, so only the first run on a machine pays for the probe. `at_least`:
    a rate this device was seen to reach (a run's own); a known peak below it is wrong by definition (a
    probe on a busy machine), so it is probed again, raised to `at_least` if still below, and re-cached.
    """
    return _peak(device_type, dtype_name, seconds, at_least)[0]


def _peak(device_type: str, dtype_name: str, seconds: float, at_least: float) -> tuple[float, str]:
    """(peak FLOP/s, "" or how a known figure below `at_least` was corrected): see `measured_peak_flops`."""
    key = _probe_key(device_type, dtype_name)
    cache = _peak_cache_file()
    known = _read_json(cache)
    peak = _PEAKS.get(key, known.get(key))
    how = ""
    if isinstance(peak, (int, float)) and peak > 0 and at_least <= peak:
        _PEAKS[key] = float(peak)
        return float(peak), ""
    if isinstance(peak, (int, float)) and peak > 0:
        how = f"re-probed: the known {peak / 1e9:.3g} GFLOP/s was below this run's own {at_least / 1e9:.3g}"
    peak = probe_peak_flops(device_type, dtype_name, seconds)
    if peak < at_least:  # a machine busier now than during the run: the run's own rate is the best known
        how = (how + "; " if how else "") + (f"this run's own rate: the probe read {peak / 1e9:.3g} GFLOP/s, "
                                              "less than the run did")
        peak = at_least
    _PEAKS[key] = known[key] = float(peak)
    _write_json(cache, known)
    return float(peak), how


def probe_rates(device_type: str, dtype_name: str, seconds: float = 9.0) -> dict[str, float]:
    """Each engine's best sustained rate over PROBE_SHAPES, measured now (no cache), in FLOP/s."""
    shapes = sorted(PROBE_SHAPES.get(device_type, PROBE_SHAPES["cpu"]))
    dtype = getattr(torch, dtype_name)
    engines = probe_engines(device_type, dtype)
    share = seconds / (len(shapes) * len(engines))
    rates = dict.fromkeys(engines, 0.0)
    for n in shapes:
        best = max(rates.values())
        # a slow (e.g. emulated bf16) dtype: bigger shapes would take minutes and show nothing new, since
        # the rate is far below any matmul unit's peak there
        if best and 2 * n**3 / best > share / 2:
            break
        for engine in engines:
            rates[engine] = max(rates[engine], _sustained_rate(n, dtype, device_type, share, engine))
    return rates


def probe_peak_flops(device_type: str, dtype_name: str, seconds: float = 9.0) -> float:
    """Measure the best sustained matmul rate now (no cache): see `measured_peak_flops`."""
    return max(probe_rates(device_type, dtype_name, seconds).values())


def _peak_cache_file() -> Path:
    root = os.environ.get("MICROFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "microft")
    return Path(root) / "peak-flops.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Best effort (a read-only home must not fail a run): write a temp file, then rename it in place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform's answer)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_dtype(device: torch.device, precision: str | PrecisionPolicy) -> str:
    """The dtype a run's matmuls run in: its policy's compute dtype, but fp32 for bf16 on a CPU where microft
    multiplies bf16 values in fp32 (no native bf16: models.linear), whose rate a bf16 probe would understate
    ~20x."""
    dtype = precision_policy(precision).compute_dtype
    if dtype == "bfloat16" and device.type == "cpu" and bf16_products_in_fp32():
        return "float32"
    return dtype


def device_peak_flops(device: torch.device, precision: str | PrecisionPolicy, observed: float = 0.0
                      ) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): a table for known GPUs, a probe otherwise. `observed`:
    the run's own model FLOP/s per device; a probed peak below it is re-probed (`measured_peak_flops`), so
    the MFU it gives is never above 100 %."""
    policy = precision_policy(precision)
    low = policy.low_precision
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (tf if low else tf / 2) * 1e12, f"table ({key})"
    dtype = peak_dtype(device, policy)
    shapes = "/".join(f"{n}²" for n in PROBE_SHAPES.get(device.type, PROBE_SHAPES["cpu"]))
    engines = "/".join(probe_engines(device.type, getattr(torch, dtype)))
    peak, how = _peak(device.type, dtype, 9.0, observed)
    src = f"best sustained {dtype} matmul, {shapes}, {engines}"
    if dtype != policy.compute_dtype:  # bf16 where microft multiplies it in fp32 (peak_dtype)
        src += "; bf16 is multiplied in fp32 on this CPU"
    return peak, f"{src}; {how}" if how else src


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def memory_stats(device: torch.device) -> dict[str, int]:
    """Peak memory so far: CUDA allocated/reserved, MPS now (torch.mps keeps no peak), or on CPU the RSS."""
    if device.type == "cuda":
        return {
            "cuda_max_allocated": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(device),
        }
    if device.type == "mps":
        return {
            "mps_allocated": torch.mps.current_allocated_memory(),  # tensors
            "mps_driver_allocated": torch.mps.driver_allocated_memory(),  # Metal's total for this process
            "peak_rss": peak_rss_bytes(),
        }
    return {"peak_rss": peak_rss_bytes()}


# macOS lets a process wire about this share of unified memory for the GPU when torch cannot
# report Metal's recommendedMaxWorkingSetSize (older torch): about 2/3 up to 36 GiB of RAM, 3/4 above
MPS_WIRED_SHARE = ((36 * 2**30, 2 / 3), (None, 3 / 4))


def mps_memory_budget() -> tuple[int, str]:
    """(bytes, how they were found) the GPU of an Apple-silicon Mac may use: Metal's recommended
    working set (torch.mps.recommended_max_memory), else the documented share of total RAM."""
    rec = getattr(torch.mps, "recommended_max_memory", None)
    if rec is not None:
        with contextlib.suppress(Exception):
            n = int(rec())
            if n > 0:
                return n, "Metal's recommended working set"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = next(f for limit, f in MPS_WIRED_SHARE if limit is None or total <= limit)
    return int(total * share), f"{share:.0%} of {total / 2**30:.0f} GiB unified memory"
