"""The optimizer registry (microft.optimizers): every entry builds, steps, checkpoints and resumes
bit-exactly, its state model is the real optimizer's state, and its replayed step is the traced real step
to the byte.

Parametrised over `OPTIMIZERS`, so a new entry is held to all of it by construction."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from microft.config import OPTIMIZER_KEYS, BatchPlan, RunConfig, choices_of
from microft.memory.estimate import load_shape, setup_for
from microft.optimizers import HYPERPARAMETERS, OPTIMIZERS, Optimizer, Settings, hyperparameter_help, readers
from microft.options import RUN_OPTIONS
from microft.train.loop import train
from microft.train.optim import build_optimizer
from tests.helpers import masked_samples, run_config, tiny_model
from tests.test_memory_sync import assert_replay_is_the_trace

NAMES = list(OPTIMIZERS)
PRECISIONS = ["fp32", "bf16-true"]  # bf16-true: bf16 parameters (AdamW's exact fp32 masters)
GRID = [(n, p) for n in NAMES for p in PRECISIONS]
IDS = [f"{n}-{p}" for n, p in GRID]


def test_an_entry_cannot_leave_a_part_out():
    whole = {f.name: getattr(OPTIMIZERS["sgd"], f.name) for f in dataclasses.fields(Optimizer)}
    assert Optimizer(**whole) == OPTIMIZERS["sgd"]
    for part in whole:  # every field is required
        with pytest.raises(TypeError, match=part):
            Optimizer(**{k: v for k, v in whole.items() if k != part})
    with pytest.raises(ValueError, match="HYPERPARAMETERS"):
        Optimizer(**{**whole, "reads": ("nesterov",)})
    with pytest.raises(TypeError, match="replay must be callable"):
        Optimizer(**{**whole, "replay": None})


def test_names_flags_and_their_checks_come_from_the_registry():
    assert choices_of("optimizer") == NAMES
    assert RUN_OPTIONS["optimizer"].__metadata__[0].help == " | ".join(NAMES) + "."
    for h in HYPERPARAMETERS:
        assert h in RunConfig.model_fields and OPTIMIZER_KEYS[h] == readers(h) != ()
        option = RUN_OPTIONS[h].__metadata__[0]
        assert option.default == "--" + h.replace("_", "-")  # typer keeps the flag there
        assert option.help == hyperparameter_help(h)
        for name in NAMES:
            if name in readers(h):
                assert getattr(RunConfig(optimizer=name, **{h: 0.5}), h) == 0.5
            else:  # a flag the optimizer would ignore is refused
                with pytest.raises(ValueError, match=f"applies to --optimizer .*not {name}"):
                    RunConfig(optimizer=name, **{h: 0.5})


def test_the_registry_config_and_options_import_no_torch():
    code = "import sys, microft.optimizers, microft.config, microft.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


class _Shape:
    """A real parameter as the registry's memory model sees one (memory.sim.Par's fields)."""

    def __init__(self, name: str, p: torch.Tensor):
        self.name, self.shape, self.numel, self.ndim = name, tuple(p.shape), p.numel(), p.dim()
        self.es = p.element_size()


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n):
        idx = torch.randint(0, 500, (2, 16), generator=g)
        loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,precision", GRID, ids=IDS)
def test_every_optimizer_builds_steps_and_holds_the_state_its_entry_models(name, precision):
    """Each parameter's state on the device is the entry's `state`: the same keys in order, bytes, dtypes."""
    cfg = RunConfig(optimizer=name, lr=1e-2, precision=precision)
    model = tiny_model()
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    _steps(model, opt, 2)
    entry = OPTIMIZERS[name]
    settings = Settings(bf16_weights=precision == "bf16-true", momentum=cfg.momentum)
    for n, p in model.named_parameters():
        if p.dim() >= 2:  # every matrix moved (a bf16 norm weight may not, under SGD's small steps)
            assert not torch.equal(p.detach(), before[n]), n
        real = [(k, t.numel() * t.element_size(), t.dtype) for k, t in opt.state[p].items()
                if torch.is_tensor(t) and k not in entry.host_state]
        modelled = [(t.key, t.nbytes, getattr(torch, t.dtype) if t.dtype else p.dtype)
                    for t in entry.state(_Shape(n, p), settings)]
        assert real == modelled, n
        assert all(opt.state[p][k].device.type == "cpu" for k in entry.host_state), n


@pytest.mark.parametrize("name,precision", GRID, ids=IDS)
def test_every_optimizer_resumes_from_a_checkpoint_bit_exactly(tmp_path, name, precision):
    """train() to step 4, saving at step 2; a fresh model resumed from step 2's checkpoint (in another --out)
    ends with the same weights, losses and optimizer state, dtypes included."""
    samples, plan = masked_samples(16, seed=5), BatchPlan(micro_bs=2, accum=1)
    kw = dict(max_steps=4, save_every=2, keep_last=2, optimizer=name, precision=precision, dropout=None)
    ref_model, ref_events = tiny_model(), []
    train(ref_model, samples, None, run_config(tmp_path / "ref", **kw), plan, ref_events.append)
    resumed, events = tiny_model(seed=99), []  # different init: everything must come from the checkpoint
    step_2 = tmp_path / "ref" / "checkpoints" / "step-0000002"
    cfg = run_config(tmp_path / "resumed", resume=str(step_2), **kw)
    train(resumed, samples, None, cfg, plan, events.append)
    losses = [[e["loss"] for e in ev if e["kind"] == "step"] for ev in (ref_events, events)]
    assert losses[1] == losses[0][2:]
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    ref_state, state = (torch.load(tmp_path / out / "checkpoints" / "step-0000004" / "train_state.pt",
                                   weights_only=False)["optimizer"]["state"] for out in ("ref", "resumed"))
    assert ref_state.keys() == state.keys() and ref_state
    for pid, s in ref_state.items():
        assert s.keys() == state[pid].keys()
        for k, t in s.items():
            if torch.is_tensor(t):
                assert t.dtype == state[pid][k].dtype and torch.equal(t, state[pid][k]), (pid, k)
            else:
                assert t == state[pid][k], (pid, k)


@pytest.mark.parametrize("name,precision", GRID, ids=IDS)
def test_every_optimizers_estimate_is_the_trace(name, precision):
    """The entry's replayed step against the real optimizer on fake tensors: every component and step peak, to
    the byte. qwen2-tiny: biases (the group without weight decay), MLP matrices of 8,192 values (8-bit
    moments) beside smaller ones (fp32 moments), and a peak in the optimizer step."""
    cfg = RunConfig(optimizer=name, precision=precision, max_seq_len=16)
    arch = load_shape("qwen2-tiny")
    assert_replay_is_the_trace(arch, setup_for(cfg, arch, 1), cfg)
