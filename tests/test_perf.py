"""The MFU peak: a sustained large-matmul probe, cached per machine."""

import json

import torch

from microft import perf


def test_probe_measures_sustained_large_matmuls(monkeypatch):
    seen = []

    def fast(n, dtype, device_type, seconds, engine):  # 1 PFLOP/s: every shape is cheap, so every shape is probed
        seen.append((n, dtype, seconds, engine))
        return 1e15

    monkeypatch.setattr(perf, "_sustained_rate", fast)
    assert perf.probe_peak_flops("cpu", "float32", seconds=3.0) == 1e15
    engines = perf.probe_engines("cpu", torch.float32)
    assert [(n, e) for n, _, _, e in seen] == [(n, e) for n in sorted(perf.PROBE_SHAPES["cpu"]) for e in engines]
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
    assert perf.probe_engines("cuda", torch.bfloat16) == ("torch",)


def test_probe_stops_before_shapes_that_would_take_minutes(monkeypatch):
    """An emulated dtype (bf16 on an AVX2-only CPU) runs ~20x below fp32: one 3072² matmul would take
    seconds, so the probe keeps the rate it has instead of stalling the end of every run."""
    seen = []
    monkeypatch.setattr(perf, "_sustained_rate", lambda n, d, t, s, e: seen.append(n) or 2e9)
    assert perf.probe_peak_flops("cpu", "bfloat16", seconds=4.0) == 2e9
    assert set(seen) == {min(perf.PROBE_SHAPES["cpu"])}


def test_every_probe_engine_computes_the_product_at_a_real_rate():
    a, b = torch.randn(64, 48), torch.randn(48, 80)
    for engine in perf.probe_engines("cpu", torch.float32):
        out = perf._matmul(engine, a, b)()
        torch.testing.assert_close(torch.as_tensor(out), a @ b, rtol=1e-4, atol=1e-4)
        rate = perf._sustained_rate(256, torch.float32, "cpu", 0.2, engine)
        assert 1e8 < rate < 1e14, engine  # FLOP/s of a real CPU, not a unit slip


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
    assert source.startswith("best sustained float32 matmul") and "3072²" in source and "torch" in source
