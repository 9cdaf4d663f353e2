"""The MFU peak: a sustained large-matmul probe, cached per machine."""

import json

import torch

from microft import perf


def test_probe_measures_sustained_large_matmuls(monkeypatch):
    seen = []

    def fast(n, dtype, device_type, seconds):  # 1 PFLOP/s: every shape is cheap, so every shape is probed
        seen.append((n, dtype, seconds))
        return 1e15

    monkeypatch.setattr(perf, "_sustained_rate", fast)
    assert perf.probe_peak_flops("cpu", "float32", seconds=3.0) == 1e15
    assert [n for n, _, _ in seen] == sorted(perf.PROBE_SHAPES["cpu"])
    assert all(d == torch.float32 for _, d, _ in seen)
    assert abs(sum(s for _, _, s in seen) - 3.0) < 1e-9


def test_probe_stops_before_shapes_that_would_take_minutes(monkeypatch):
    """An emulated dtype (bf16 on an AVX2-only CPU) runs ~20x below fp32: one 3072² matmul would take
    seconds, so the probe keeps the rate it has instead of stalling the end of every run."""
    seen = []
    monkeypatch.setattr(perf, "_sustained_rate", lambda n, d, t, s: seen.append(n) or 2e9)
    assert perf.probe_peak_flops("cpu", "bfloat16", seconds=4.0) == 2e9
    assert seen == [min(perf.PROBE_SHAPES["cpu"])]


def test_probe_rate_is_a_real_cpu_rate():
    rate = perf._sustained_rate(256, torch.float32, "cpu", 0.2)
    assert 1e8 < rate < 1e14  # FLOP/s of a real CPU, not a unit slip


def test_peak_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROFT_CACHE", str(tmp_path))
    perf.measured_peak_flops.cache_clear()
    calls = []
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: calls.append((d, t)) or 123e9)
    assert perf.measured_peak_flops("cpu", "bfloat16") == 123e9
    stored = json.loads((tmp_path / "peak-flops.json").read_text())
    assert list(stored.values()) == [123e9]
    assert "bfloat16" in next(iter(stored))
    perf.measured_peak_flops.cache_clear()  # a new process: the file answers, no second probe
    assert perf.measured_peak_flops("cpu", "bfloat16") == 123e9
    assert calls == [("cpu", "bfloat16")]
    perf.measured_peak_flops.cache_clear()


def test_unwritable_cache_does_not_fail(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MICROFT_CACHE", str(blocker / "below-a-file"))
    perf.measured_peak_flops.cache_clear()
    monkeypatch.setattr(perf, "probe_peak_flops", lambda d, t, s: 7e9)
    assert perf.measured_peak_flops("cpu", "float32") == 7e9
    perf.measured_peak_flops.cache_clear()


def test_peak_source_names_the_probe():
    perf.measured_peak_flops.cache_clear()
    _, source = perf.device_peak_flops(torch.device("cpu"), "fp32")
    assert source.startswith("best sustained float32 matmul") and "3072²" in source
