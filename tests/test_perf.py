"""The MFU peak: a sustained large-matmul probe, cached per machine, corrected by what a run reaches."""

import json
import types

import pytest
import torch

from microft import perf


@pytest.fixture(autouse=True)
def _fresh_peaks(monkeypatch):
    """Each test starts as a new process would: no peak known in memory."""
    monkeypatch.setattr(perf, "_PEAKS", {})


def test_probe_measures_sustained_large_matmuls(monkeypatch):
    seen = []

    # 1 PFLOP/s: every shape is cheap, so every shape is probed
    def fast(n, dtype, device_type, seconds, engine):
        seen.append((n, dtype, seconds, engine))
        return 1e15

    monkeypatch.setattr(perf, "_sustained_rate", fast)
    assert perf.probe_peak_flops("cpu", "float32", seconds=3.0) == 1e15
    engines = perf.probe_engines("cpu", torch.float32)
    assert [(n, e) for n, _, _, e in seen] == [(n, e) for n in sorted(perf.PROBE_SHAPES["cpu"])
                                                for e in engines]
    assert all(d == torch.float32 for _, d, _, _ in seen)
    assert abs(sum(s for _, _, s, _ in seen) - 3.0) < 1e-9


def test_probe_takes_the_fastest_engine(monkeypatch):
    """On an AVX2 EPYC numpy's OpenBLAS ran a 2048² product 1.2-1.3x faster than torch's `@` (MKL): a peak
    from torch alone would overstate every MFU by that much."""
    rates = {"torch": 100e9, "onednn": 110e9, "numpy": 130e9}
    monkeypatch.setattr(perf, "_sustained_rate", lambda n, d, t, s, e: rates[e] * (1 + n / 1e5))
    engines = perf.probe_engines("cpu", torch.float32)
    got = perf.probe_rates("cpu", "float32", seconds=100.0)
    assert set(got) == set(engines) and got["torch"] == rates["torch"] * (1 + 3072 / 1e5)
    assert perf.probe_peak_flops("cpu", "float32", seconds=100.0) == max(got.values())
    assert "numpy" not in perf.probe_engines("cpu", torch.bfloat16)  # numpy has no bf16 matmul
    assert "linear" in perf.probe_engines("cpu", torch.bfloat16) and "linear" not in engines
    assert perf.probe_engines("cuda", torch.bfloat16) == ("torch",)


def test_probe_stops_before_shapes_that_would_take_minutes(monkeypatch):
    """An emulated dtype (bf16 on an AVX2-only CPU) runs ~20x below fp32: one 3072² matmul would take
    seconds, so the probe keeps the rate it has instead of stalling the end of every run."""
    seen = []
    monkeypatch.setattr(perf, "_sustained_rate", lambda n, d, t, s, e: seen.append(n) or 2e9)
    assert perf.probe_peak_flops("cpu", "bfloat16", seconds=4.0) == 2e9
    assert set(seen) == {min(perf.PROBE_SHAPES["cpu"])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_probe_engine_computes_the_product_at_a_real_rate(dtype):
    """Each engine the probe lists runs in its dtype on this CPU (held to AVX2, oneDNN has no bf16 or fp16
    linear: the probe used to crash there at the end of every bf16 run) and computes a @ b."""
    a, b = torch.randn(64, 48).to(dtype), torch.randn(48, 80).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for engine in perf.probe_engines("cpu", dtype):
        out = perf._matmul(engine, a, b)()
        torch.testing.assert_close(torch.as_tensor(out).float(), (a.float() @ b.float()), rtol=tol, atol=tol)
        rate = perf._sustained_rate(128 if dtype != torch.float32 else 256, dtype, "cpu", 0.1, engine)
        assert 1e6 < rate < 1e14, engine  # FLOP/s of a real CPU, not a unit slip (emulated half: ~1e8-1e10)


def test_the_probe_keeps_its_best_short_burst(monkeypatch):
    """Under other jobs' load a long average measures the load: the probe keeps the best of several short
    bursts after a warm-up, so one quiet burst among busy ones gives the hardware's rate."""
    clock = [0.0]
    costs = iter([3.0] * 4 + [1.0] * 6 + [3.0] * 100)  # warm-up, a busy burst, a quiet one, busy ones
    monkeypatch.setattr(perf, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def fake(engine, a, b):
        return lambda: clock.__setitem__(0, clock[0] + next(costs))

    monkeypatch.setattr(perf, "_matmul", fake)
    n = 8
    rate = perf._sustained_rate(n, torch.float32, "cpu", 6 * 6.0, "torch")  # bursts of 6 clock units
    assert rate == pytest.approx(2 * n**3 / 1.0)  # the quiet burst's: one matmul per unit of time
    assert clock[0] == pytest.approx(6 * 6.0)  # the budget: a warm-up and five bursts


def test_peak_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: calls.append((d, t)) or 123e9)
    assert perf.measured_peak_flops("cpu", "bfloat16") == 123e9
    stored = json.loads((tmp_path / "peak-flops.json").read_text())
    assert list(stored.values()) == [123e9]
    assert "bfloat16" in next(iter(stored))
    monkeypatch.setattr(perf, "_PEAKS", {})  # a new process: the file answers, no second probe
    assert perf.measured_peak_flops("cpu", "bfloat16") == 123e9
    assert calls == [("cpu", "bfloat16")]


def test_unwritable_cache_does_not_fail(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MICROFT_CACHE", str(blocker / "below-a-file"))
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: 7e9)
    assert perf.measured_peak_flops("cpu", "float32") == 7e9


def test_peak_source_names_the_probe():
    _, source = perf.device_peak_flops(torch.device("cpu"), "fp32")
    assert source.startswith("best sustained float32 matmul") and "3072²" in source and "torch" in source


def test_a_cached_peak_below_what_a_run_reached_is_reprobed_and_corrected(monkeypatch, tmp_path):
    """A peak probed on a busy machine (the issue's 40 GFLOP/s against a quiet 79) is wrong once a run
    computes faster than it: it is probed again and the cache keeps the new figure; where the new probe is
    still below the run's own rate (the machine busy again), the run's rate is the peak."""
    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path))
    key = perf._probe_key("cpu", "float32")
    (tmp_path / "peak-flops.json").write_text(json.dumps({key: 40e9}))
    probes = iter([79e9, 50e9])
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: next(probes))
    assert perf.measured_peak_flops("cpu", "float32", at_least=30e9) == 40e9  # below the peak: no probe
    peak, source = perf.device_peak_flops(torch.device("cpu"), "fp32", observed=60e9)
    assert peak == 79e9 and "re-probed" in source and "40 GFLOP/s" in source
    assert json.loads((tmp_path / "peak-flops.json").read_text())[key] == 79e9
    peak, source = perf.device_peak_flops(torch.device("cpu"), "fp32", observed=90e9)
    assert peak == 90e9 and "this run's own rate" in source and "50 GFLOP/s" in source
    monkeypatch.setattr(perf, "_PEAKS", {})
    assert perf.measured_peak_flops("cpu", "float32") == 90e9  # the next process reads the corrected figure


def test_mfu_of_a_run_is_never_above_100_percent(monkeypatch, tmp_path):
    """A cached peak far below what the run computes (a stand-in of 1 kFLOP/s) and a probe that reads low
    too: the summary's MFU is at most 1, its source says why, and the cache is corrected."""
    from microft.config import BatchPlan
    from microft.train.loop import train
    from microft.ui import summary_lines
    from tests.helpers import masked_samples, run_config, tiny_model

    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = perf._probe_key("cpu", "float32")
    (tmp_path / "cache" / "peak-flops.json").write_text(json.dumps({key: 1e3}))
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: 2e3)
    cfg = run_config(tmp_path / "out", max_steps=2, precision="fp32")
    summary = train(tiny_model(), masked_samples(8, seed=1), None, cfg, BatchPlan(micro_bs=2, accum=1),
                    lambda e: None)
    assert 0 < summary["mfu"] <= 1.0 and summary["peak_flops"] > 2e3
    assert "this run's own rate" in summary["peak_flops_source"]
    assert json.loads((tmp_path / "cache" / "peak-flops.json").read_text())[key] == summary["peak_flops"]
    mfu_text = dict(summary_lines(summary))["MFU"]
    assert float(mfu_text.split("%")[0]) <= 100.0


def test_bf16_multiplied_in_fp32_divides_by_the_fp32_peak(monkeypatch):
    """Where microft runs bf16 products in fp32 (a CPU without native bf16), the MFU's peak is fp32's: the
    bf16 probe measures torch's emulated kernels, ~20x slower, which the run never calls."""
    from microft.models import linear as L

    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    cpu = torch.device("cpu")
    assert perf.peak_dtype(cpu, "bf16-true") == perf.peak_dtype(cpu, "bf16-mixed") == "float32"
    assert perf.peak_dtype(cpu, "fp16-mixed") == "float16" and perf.peak_dtype(cpu, "fp32") == "float32"
    monkeypatch.setattr(L, "_half_via_fp32", False)  # MICROFT_HALF_VIA_FP32=0: torch's bf16 kernels
    assert perf.peak_dtype(cpu, "bf16-mixed") == "bfloat16"
    monkeypatch.setattr(L, "_half_via_fp32", True)
    monkeypatch.setenv("MICROFT_CPU_BF16", "1")
    assert perf.peak_dtype(cpu, "bf16-mixed") == "bfloat16"


def test_the_peak_reads_the_precision_policy(monkeypatch, tmp_path):
    """The MFU's peak takes a policy as well as its word, and gives the same answer: the policy's compute
    dtype decides the probe (fp32 where this CPU multiplies bf16 in fp32, and the source says so)."""
    from microft.resolved import POLICIES

    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path))
    monkeypatch.setenv("MICROFT_CPU_BF16", "0")
    monkeypatch.setattr(perf, "_PEAKS", {})
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: {"float32": 5e9}.get(t, 1e9))
    cpu = torch.device("cpu")
    for name, policy in POLICIES.items():
        by_word, by_policy = perf.device_peak_flops(cpu, name), perf.device_peak_flops(cpu, policy)
        assert by_word == by_policy
        emulated = policy.compute_dtype == "bfloat16"
        assert by_policy[0] == (1e9 if policy.compute_dtype == "float16" else 5e9), name
        assert ("bf16 is multiplied in fp32" in by_policy[1]) == emulated, name


def test_a_cpu_held_to_fewer_instructions_has_its_own_cached_peak(monkeypatch):
    """The peak of kernels held to AVX2 (make test-avx2, a benchmark of an AVX2-only CPU) is not the machine's
    own: each gets its own cache entry (a held run used to divide by the full-width AMX peak)."""
    for k in perf.KERNEL_ISA_ENVS:
        monkeypatch.delenv(k, raising=False)
    own = perf._probe_key("cpu", "bfloat16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    held = perf._probe_key("cpu", "bfloat16")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert len({own, held, perf._probe_key("cpu", "bfloat16")}) == 3 and "ONEDNN_MAX_CPU_ISA=AVX2" in held
