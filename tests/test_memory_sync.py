"""The analytical replay against the traced real step, for every model family, component by component.

The grid is derived from the presets: every tiny preset (one per family) × {fp32, bf16-mixed,
bf16-mixed + grad ckpt, LoRA on every linear}, so a new family's tiny preset is covered by
construction. The sequence (64) exceeds mistral-tiny's sliding window (16), so its mask is
exercised. Every component at the peak and every optimizer step's peak must agree to the byte,
and every aten op the real step dispatches must be one the replay models (replay.TRACED_OPS).
Further grids place the peak where quantized code, the preference step, or a single scalar the step
makes (fp16's GradScaler, a bf16 head's loss backward) decides it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from microft.config import RunConfig
from microft.memory.estimate import estimate, load_shape, setup_for, trace
from microft.memory.preference import NEEDS_REFERENCE, PairReplay, reference_kind
from microft.memory.replay import TRACED_OPS, Replay
from microft.models.config import ce_chunk_rows
from microft.models.families import FAMILIES
from microft.optimizers import OPTIMIZERS
from microft.train import preference as train_preference

TINY = [f.tiny for f in FAMILIES.values()]  # every family's tiny model
VARIANTS = {
    "fp32": ("fp32", {}, 1),
    "bf16-mixed": ("bf16-mixed", {}, 2),
    "grad-ckpt": ("bf16-mixed", {"grad_ckpt": True}, 1),
    "lora": ("fp32", {"lora": True, "lora_targets": "all", "lora_r": 4}, 1),
}
GRID = [(m, v) for m in TINY for v in VARIANTS]


def test_the_grid_covers_every_family():
    families = {load_shape(m).model_type for m in TINY}
    assert families == set(FAMILIES) >= {"gpt2", "llama", "mistral", "qwen2", "qwen3"}
    assert len(GRID) >= 12


def assert_replay_is_the_trace(arch, s, cfg):
    """The analytical replay and the fake-tensor trace agree to the byte: every component, every step's
    peak, where and in which phase the peak falls; and the trace dispatched no op the replay leaves out."""
    a, t = estimate(arch, s), trace(arch, s, max_grad_norm=cfg.max_grad_norm, steps=s.steps)
    unmodelled = sorted(set(t.ops) - set(TRACED_OPS))
    assert not unmodelled, f"the real step dispatches ops the replay does not model: {unmodelled}"
    assert a.components == t.components, f"{a.peak_where} vs {t.peak_where}"
    assert a.step_peaks == t.step_peaks
    assert a.peak_bytes == t.peak_bytes and a.peak_where == t.peak_where and a.peak_phase == t.peak_phase
    return a


@pytest.mark.parametrize("model,variant", GRID, ids=[f"{m}-{v}" for m, v in GRID])
def test_replay_matches_the_trace_to_the_byte(model, variant):
    precision, kw, accum = VARIANTS[variant]
    cfg = RunConfig(precision=precision, max_seq_len=64, **kw)
    arch = load_shape(model, cfg.dropout)
    s = setup_for(cfg, arch, 4, accum=accum)
    assert_replay_is_the_trace(arch, s, cfg)


# Peaks placed where a small allocation of the real step decides them (the grid above never puts one there):
# name: (preset, precision, optimizer, optimizer steps replayed) -> (phase, where, a component, its bytes)
# Neither is an artefact of tracing on the CPU: both are 0-dim tensors the same Python code makes on CUDA.
PEAK_PLACES = {
    # fp16's GradScaler.step on torch's fused AdamW: found_inf = sum(per-device flags) is a new tensor (0 +
    # flag) held through the step, beside unscale_'s flag and the gradient norm
    "fp16-adamw-optimizer-step": ("llama-tiny", "fp16-mixed", "adamw", 1,
                                  ("optimizer step", "step 1, optimizer step", "optimizer transients", 1536)),
    # ... which SGD's step does not get (the scaler reads the flag itself): its momentum update's foreach
    # temporaries (425,984 bytes here), the flag and the norm
    "fp16-sgd-optimizer-step": ("llama-tiny", "fp16-mixed", "sgd", 1,
                                ("optimizer step", "step 1, optimizer step", "optimizer transients",
                                 425984 + 1024)),
    # a bf16 head's backward casts the fp32 loss gradient to bf16 to scale its gradient (models/loss.py),
    # a scalar beside grad_h, its loss-gradient product and the new head gradient. (An untied head's peak
    # stays in the optimizer step: its temporaries for two vocabulary-sized matrices outweigh the loss's.)
    "bf16-true-sgd-loss-backward": ("gpt2-tiny", "bf16-true", "sgd", 2,
                                    ("start of backward", "step 2, micro-step 1, backward of the loss",
                                     "backward transients", 3072)),
}


@pytest.mark.parametrize("name", list(PEAK_PLACES))
def test_replay_matches_the_trace_where_a_scalar_sets_the_peak(name):
    model, precision, optimizer, steps, (phase, where, component, nbytes) = PEAK_PLACES[name]
    cfg = RunConfig(precision=precision, max_seq_len=8, optimizer=optimizer)
    arch = load_shape(model, cfg.dropout)
    a = assert_replay_is_the_trace(arch, replace(setup_for(cfg, arch, 1), steps=steps), cfg)
    assert (a.peak_phase, a.peak_where, a.components[component]) == (phase, where, nbytes)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_optimizers_that_take_the_scalers_flag_are_the_ones_the_replay_names(optimizer):
    """scaler.step gives an optimizer with `_step_supports_amp_scaling` a flag of its own (replayed): the
    registry entry's `amp_scaling` says which build one."""
    import torch
    from torch import nn

    from microft.train.optim import build_optimizer

    opt = build_optimizer(nn.Linear(4, 4), RunConfig(precision="fp16-mixed", optimizer=optimizer),
                          torch.device("cpu"))
    assert getattr(opt, "_step_supports_amp_scaling", False) == OPTIMIZERS[optimizer].amp_scaling


def test_every_listed_op_names_a_replay_method():
    assert all(hasattr(PairReplay, method) for method in TRACED_OPS.values())  # Replay's, or the dpo step's


def test_an_unmodelled_op_fails_by_name(monkeypatch):
    """A model change that dispatches a new op (here: an extra erfc in the SwiGLU MLP) is caught by name."""
    import torch

    from microft.models import transformer

    plain = transformer.F.silu
    monkeypatch.setattr(transformer.F, "silu", lambda x: plain(x) * torch.erfc(x * 0))
    arch = load_shape("llama-tiny")
    s = setup_for(RunConfig(precision="fp32", max_seq_len=16), arch, 1)
    t = trace(arch, s)
    assert "aten.erfc.default" in set(t.ops) - set(TRACED_OPS)


@pytest.mark.parametrize("model", TINY)
def test_lora_targets_follow_the_family(model):
    arch = load_shape(model)
    targets = "q_proj,v_proj" if arch.model_type != "gpt2" else "qkv"
    s = setup_for(RunConfig(lora=True, lora_targets=targets), arch, 1)
    adapted = {p.name.rsplit(".lora_", 1)[0].split(".", 2)[2] for p in Replay(arch, s).m.params
               if ".lora_" in p.name}
    assert adapted == ({"attn.c_attn"} if arch.model_type == "gpt2" else {"attn.q_proj", "attn.v_proj"})


# QLoRA (NF4 bases, plain and double-quantized) and 8-bit AdamW, across families: the trace runs the real
# NF4Linear and the real AdamW8bit. Shapes are widened, vocabularies and batches shrunk, so that each peak
# falls where the quantized code allocates (the forward's or the backward's dequantization, the 8-bit
# update) rather than in the loss; r=64 gives the LoRA matrices 8-bit state.
QLORA = {"lora": True, "lora_targets": "all", "quantize": "nf4"}
WIDE = {"n_embd": 256, "intermediate_size": 1024}
SMALL_VOCAB = {"vocab_size": 512, "padded_vocab": 512}
# name: (preset, precision, run options, micro-bs, seq, shape changes, accum) -> where the peak falls
QUANT_GRID = {
    "llama-qlora-fp32": ("llama-tiny", "fp32", {**QLORA, "lora_r": 4}, 1, 8, WIDE, 1),  # backward dequantize
    "llama-qlora-forward": ("llama-tiny", "fp32", {**QLORA, "lora_r": 4, "lora_targets": "down_proj"}, 1, 8,
                            {**WIDE, "n_layer": 1}, 1),  # forward dequantization (no gradient to the input)
    "llama-qlora-dq-8bit": ("llama-tiny", "bf16-mixed", {**QLORA, "double_quant": True, "lora_r": 64,
                                                           "optimizer": "adamw-8bit"}, 1, 16, {}, 1),  # 8-bit
    "gpt2-qlora-dq-bias": ("gpt2-tiny", "bf16-mixed", {**QLORA, "double_quant": True, "lora_r": 4}, 1, 8,
                           {**WIDE, **SMALL_VOCAB, "head_dim": 128}, 1),  # biases, padded absmax blocks
    "qwen2-qlora-bf16-true-bias": ("qwen2-tiny", "bf16-true", {**QLORA, "lora_r": 4}, 1, 8, {"n_embd": 192},
                                   1),
    "qwen3-qlora-ckpt-padded": ("qwen3-tiny", "bf16-mixed", {**QLORA, "lora_r": 4, "grad_ckpt": True}, 1, 8,
                                {"n_embd": 72, "intermediate_size": 600}, 1),  # recompute; weights not 64k
    "mistral-qlora-8bit-window": ("mistral-tiny", "fp32", {**QLORA, "lora_r": 64, "optimizer": "adamw-8bit"},
                                  1, 32, {"n_embd": 128, "intermediate_size": 512}, 2),  # window, accum
    "qwen2-8bit-bf16-true": ("qwen2-tiny", "bf16-true", {"optimizer": "adamw-8bit"}, 1, 8, {}, 1),  # 8-bit
    "gpt2-8bit-fp32-accum": ("gpt2-tiny", "fp32", {"optimizer": "adamw-8bit"}, 1, 8, {}, 2),
}


@pytest.mark.parametrize("name", list(QUANT_GRID))
def test_qlora_and_8bit_replay_matches_the_trace_to_the_byte(name):

    model, precision, kw, micro_bs, seq, widen, accum = QUANT_GRID[name]
    cfg = RunConfig(precision=precision, max_seq_len=seq, **kw)
    arch = load_shape(model).model_copy(update=widen)
    s = setup_for(cfg, arch, micro_bs, accum=accum)
    assert_replay_is_the_trace(arch, s, cfg)


# `microft dpo`'s step (memory/preference.py): every family, each with two of the settings below in turn, so
# that every loss, every kind of reference (a frozen copy, the base with the adapters off, cached log-probs,
# none), LoRA and QLoRA, checkpointing and every precision meet several families. name: (precision, run
# options, loss, --precompute-ref, accum)
PREFERENCE = {
    "dpo-frozen-copy-fp32": ("fp32", {}, "dpo", False, 1),
    "ipo-frozen-copy-ckpt": ("bf16-mixed", {"grad_ckpt": True}, "ipo", False, 1),
    "dpo-lora-adapters-off": ("bf16-mixed", {"lora": True, "lora_targets": "all", "lora_r": 4}, "dpo", False,
                              2),
    "dpo-cached-bf16-true": ("bf16-true", {}, "dpo", True, 1),
    "simpo-lora-ckpt": ("bf16-mixed", {"lora": True, "lora_r": 4, "grad_ckpt": True}, "simpo", False, 1),
    "orpo-fp16-mixed": ("fp16-mixed", {}, "orpo", False, 1),
    "ipo-qlora-ckpt": ("bf16-mixed", {**QLORA, "lora_r": 4, "grad_ckpt": True}, "ipo", False, 1),
}
_NAMES = list(PREFERENCE)
PREFERENCE_GRID = [(m, v) for i, m in enumerate(TINY) for v in (_NAMES[i % 7], _NAMES[(i + 3) % 7])]


def preference_setup(cfg: RunConfig, arch, micro_bs: int, accum: int = 1):
    return replace(setup_for(cfg, arch, micro_bs, accum=accum), method="dpo", pref_loss=cfg.loss,
                   precompute_ref=cfg.precompute_ref)


def test_the_preference_grid_covers_every_setting_and_family():
    assert {v for _, v in PREFERENCE_GRID} == set(PREFERENCE) and {m for m, _ in PREFERENCE_GRID} == set(TINY)
    cfgs = [RunConfig(lora=kw.get("lora", False), loss=loss, precompute_ref=pre)
            for _, kw, loss, pre, _ in PREFERENCE.values()]
    kinds = {reference_kind(preference_setup(cfg, load_shape("gpt2-tiny"), 1)) for cfg in cfgs}
    assert kinds == {"frozen copy", "adapters off", "cached", None}
    assert set(NEEDS_REFERENCE) == set(train_preference.NEEDS_REFERENCE)


@pytest.mark.parametrize("model,variant", PREFERENCE_GRID, ids=[f"{m}-{v}" for m, v in PREFERENCE_GRID])
def test_preference_replay_matches_the_trace_to_the_byte(model, variant):
    precision, kw, loss, precompute, accum = PREFERENCE[variant]
    cfg = RunConfig(precision=precision, max_seq_len=32, loss=loss, precompute_ref=precompute, **kw)
    arch = load_shape(model, cfg.dropout)
    assert_replay_is_the_trace(arch, preference_setup(cfg, arch, 2, accum), cfg)


# the log-prob head over several chunks: name: (preset, precision, run options)
MULTI_CHUNK = {
    # untied head: from the second chunk on, addmm_ into its gradient
    "llama-fp32": ("llama-tiny", "fp32", {}),
    "llama-lora": ("llama-tiny", "bf16-mixed", {"lora": True, "lora_r": 4}),  # frozen head: h's gradient only
    # tied: the head's gradient to the embedding's backward
    "qwen2-tied-bf16": ("qwen2-tiny", "bf16-mixed", {}),
    "gemma2-softcap-bf16-true": ("gemma2-tiny", "bf16-true", {}),  # soft-capped logits, tied
    "granite-scaled-ckpt": ("granite-tiny", "bf16-mixed", {"grad_ckpt": True}),  # logits / s
}


@pytest.mark.parametrize("name", list(MULTI_CHUNK))
def test_preference_replay_matches_the_trace_over_several_chunks_of_the_head(name):
    """More response rows than one chunk of the log-prob head holds (three chunks, the last short), padded
    vocabulary rows sliced off the head, dropout (in the LoRA reference's forward too); every way the head's
    gradient is made (into place, through a widened product, handed to a tied embedding, none)."""
    model, precision, kw = MULTI_CHUNK[name]
    cfg = RunConfig(precision=precision, max_seq_len=160, dropout=0.1, **kw)
    # a head (vocab × C) several times a chunk's logits (rows × vocab): making its gradient sets the peak
    # 65,024 rows
    arch = load_shape(model, cfg.dropout).model_copy(update={"vocab_size": 65000, "n_embd": 1536})
    s = preference_setup(cfg, arch, 2)
    assert len(range(0, 2 * 2 * 160, ce_chunk_rows(2 * 2 * 160, arch.padded_vocab_size))) == 3
    assert_replay_is_the_trace(arch, s, cfg)


@pytest.mark.parametrize("variant", list(PREFERENCE))
def test_the_planners_fast_preference_replay_gives_the_full_peak(variant):
    precision, kw, loss, precompute, accum = PREFERENCE[variant]
    cfg = RunConfig(precision=precision, max_seq_len=32, loss=loss, precompute_ref=precompute, **kw)
    arch = load_shape("qwen2-tiny")
    s = preference_setup(cfg, arch, 3, max(accum, 2))
    assert PairReplay(arch, s).run().peak == PairReplay(arch, s).run(fast=True).peak
