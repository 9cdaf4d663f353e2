"""Apple silicon: device and precision selection, the unified-memory budget and memory figures,
with MPS availability mocked (no Mac here), and no CUDA-only call anywhere on the MPS path."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from microft.config import BatchPlan
from microft.data.batches import sample_length
from microft.errors import ConfigError
from microft.memory import estimate
from microft.perf import MPS_WIRED_SHARE, memory_stats, mps_memory_budget
from microft.train import step
from microft.train.loop import batch_builder
from tests.helpers import masked_samples, run_config, tiny_model

GiB = 2**30


def _forbidden(name):
    def call(*a, **k):  # one function per name: torch's dynamo rules refuse one object under two names
        raise AssertionError(f"CUDA-only call {name} on the MPS path")
    return call


@pytest.fixture
def mac(monkeypatch):
    """An Apple-silicon Mac as torch sees it: MPS available, macOS 14, 16 GiB, no CUDA at all."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor: (14, 0) >= (major, minor))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 11 * GiB, raising=False)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 123)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 456)
    for name in ("is_available", "device_count", "get_device_capability", "get_device_properties",
                 "get_device_name", "max_memory_allocated", "max_memory_reserved", "synchronize",
                 "empty_cache", "set_device", "get_rng_state_all", "set_rng_state_all", "current_device",
                 "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, _forbidden(name))
    monkeypatch.setattr(torch.Tensor, "pin_memory", _forbidden("pin_memory"))
    monkeypatch.setattr(torch.Tensor, "cuda", _forbidden("Tensor.cuda"))
    return monkeypatch


def test_auto_picks_mps_and_bf16_on_macos_14(mac):
    device = step.resolve_device("auto")
    assert device.type == "mps" and step.resolve_device("mps").type == "mps"
    assert step.resolve_precision("auto", device) == "bf16-mixed"
    mac.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (13, 5) >= (major, minor))
    assert step.resolve_precision("auto", device) == "fp32"


def test_no_mps_means_cuda_or_cpu_and_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert step.resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="MPS is not available"):
        step.resolve_device("mps")


def test_memory_figures_come_from_torch_mps(mac):
    stats = memory_stats(torch.device("mps"))
    assert stats["mps_allocated"] == 123 and stats["mps_driver_allocated"] == 456 and stats["peak_rss"] > 0


def test_gpu_mem_auto_is_the_share_macos_lets_a_process_wire(mac):
    b = estimate.parse_budget("auto")
    assert b.bytes == 11 * GiB and b.bf16 and "Apple GPU" in b.label
    mac.delattr(torch.mps, "recommended_max_memory")  # older torch: the documented share of RAM
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = next(f for limit, f in MPS_WIRED_SHARE if limit is None or total <= limit)
    n, how = mps_memory_budget()
    assert n == int(total * share) and "unified memory" in how
    assert estimate.parse_budget("auto").bytes == n


def test_the_training_step_on_the_mps_path_makes_no_cuda_call(mac):
    """The loop's step parts with the device resolved to MPS; CPU tensors stand in for MPS ones."""
    device = step.resolve_device("auto")
    for precision in ("bf16-mixed", "fp32"):
        model = tiny_model()
        samples = masked_samples(8, seed=1)
        cfg = run_config("/nonexistent", max_steps=1, packing=precision == "fp32", max_seq_len=64)
        run = SimpleNamespace(cfg=cfg, train_set=samples, model=model,
                              lengths=[sample_length(s) for s in samples], dist=SimpleNamespace(rank=0),
                              device=device, objective=None,
                              resolved=SimpleNamespace(seq_len=64))  # the resolved length: --packing's rows
        batches, step_idx = batch_builder(run)(0, BatchPlan(micro_bs=2, accum=4))  # no pinning off CUDA
        autocast, scaler = step.autocast_context(precision, device), step.make_scaler(precision, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        before = model.wte.weight.detach().clone()
        for b in batches:
            step.micro_step(model, b.input_ids, b.labels, b.weights, 100.0, autocast, scaler, b.target_pos,
                            b.position_ids)
        norm = step.clip_gradients(model, 1.0)
        assert torch.isfinite(norm) and not step.optimizer_step(opt, scaler)
        assert not torch.equal(before, model.wte.weight)
        memory_stats(device)
