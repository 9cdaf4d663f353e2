"""The preference step's planner (`microft dpo --micro-bs auto`, `estimate-mem --method dpo`): its replay
walks three chunks of the log-prob head, holding to the byte what walking every chunk holds (so a replay
costs the same at any micro-batch, as SFT's does); the micro-batch it picks is the one an exhaustive search
picks; its details line describes the log-prob head, not SFT's fused loss."""

from __future__ import annotations

from dataclasses import replace

import pytest

from microft.config import RunConfig
from microft.memory.estimate import Budget, GiB, estimate, load_shape, resolve_precision, setup_for, trace
from microft.memory.plan import auto_batch_plan, divisors, with_method
from microft.memory.preference import PairReplay
from microft.models.config import ce_chunk_rows


def dpo_setup(cfg: RunConfig, arch, micro_bs: int, budget: Budget | None = None):
    s = setup_for(cfg, arch, micro_bs, precision=resolve_precision(cfg.precision, budget))
    return with_method(s, cfg, "dpo")


def live_at_cat(arch, s) -> list[int]:
    """The live bytes of a replay each time the log-prob head concatenates its chunks' gathered log-probs."""
    r = PairReplay(arch, s)
    new, seen = r.sim.new, []

    def spy(numel: int, es: int, cat: str, what: str = ""):
        if what == "cat":
            seen.append(r.sim.live)
        return new(numel, es, cat, what)

    r.sim.new = spy
    r.run()
    return seen


@pytest.mark.parametrize("micro_bs", [4, 5])  # 768 rows: six full chunks; 960: seven and a part
@pytest.mark.parametrize("flags", [
    {}, {"lora": True, "grad_ckpt": True}, {"precision": "fp32"}, {"loss": "simpo", "lora": True},
    {"precompute_ref": True, "optimizer": "adamw-8bit"}, {"precision": "bf16-true", "lora": True},
])
def test_the_head_replay_walks_three_chunks_and_holds_what_every_chunk_holds(monkeypatch, flags, micro_bs):
    arch = load_shape("qwen2.5-0.5b")  # 151,936 words: 128 rows a chunk
    s = dpo_setup(RunConfig(max_seq_len=96, **{"loss": "dpo", **flags}), arch, micro_bs)
    r = PairReplay(arch, s)
    n_chunks = -(-r.N // ce_chunk_rows(r.N, arch.padded_vocab_size))
    assert n_chunks > 5 and len(r.chunks()) == 3
    short, short_fast, short_cat = estimate(arch, s), estimate(arch, s, fast=True), live_at_cat(arch, s)
    monkeypatch.setattr(PairReplay, "every_chunk", True)
    assert len(PairReplay(arch, s).chunks()) == n_chunks
    full = estimate(arch, s)
    # the peak falls elsewhere here: the bytes held as the chunks' log-probs are concatenated say that the
    # skipped chunks' are held too
    assert short_cat == live_at_cat(arch, s) and len(short_cat) == (4 if s.pref_loss in ("dpo", "ipo") and
                                                                    not s.precompute_ref else 2)
    assert (short.peak_bytes, short.components, short.step_peaks, short.peak_where) == (
        full.peak_bytes, full.components, full.step_peaks, full.peak_where)
    assert short_fast.peak_bytes == full.peak_bytes


@pytest.mark.parametrize("model, precision, kw", [
    ("llama-tiny", "fp32", {}),  # untied head: its gradient made by the first chunk done, added to after
    ("qwen2-tiny", "bf16-mixed", {"lora": True, "lora_r": 4}),  # tied and frozen: h's gradient only
])
def test_the_three_chunk_replay_is_the_trace_of_six_chunks(model, precision, kw):
    """The real step walks all six chunks (the last short); the replay walks three and says the same."""
    cfg = RunConfig(precision=precision, max_seq_len=352, loss="dpo", **kw)
    arch = load_shape(model).model_copy(update={"vocab_size": 65000, "n_embd": 1536,
                                                       "n_positions": 512})  # 256 rows a chunk
    s = dpo_setup(cfg, arch, 2)
    r = PairReplay(arch, s)
    assert ce_chunk_rows(r.N, arch.padded_vocab_size) == 256 and r.N == 1408 and r.chunks() == [256, 256, 128]
    a, t = estimate(arch, s), trace(arch, s, max_grad_norm=cfg.max_grad_norm)
    assert (a.peak_bytes, a.components, a.step_peaks, a.peak_where) == (
        t.peak_bytes, t.components, t.step_peaks, t.peak_where)


def exhaustive(cfg: RunConfig, arch, budget: Budget, n_train: int) -> tuple[int, int]:
    """The largest micro-batch whose full replay (every chunk, no early stop) fits: every candidate tried."""
    if cfg.global_bs:
        cands = [(m, cfg.global_bs // m) for m in divisors(cfg.global_bs)]
    else:
        cands = [(m, cfg.accum or 1) for m in range(1, n_train // (cfg.accum or 1) + 1)]
    fitting = [(m, acc) for m, acc in cands
               if estimate(arch, replace(dpo_setup(cfg, arch, m, budget), accum=min(acc, 2)), budget).fits]
    return max(fitting)


@pytest.mark.parametrize("flags, gib", [
    ({}, 12), ({"lora": True, "grad_ckpt": True}, 3),
    ({"loss": "simpo", "precision": "fp32", "global_bs": 48}, 16),
    ({"precompute_ref": True, "optimizer": "adamw-8bit", "accum": 2}, 6),
])
def test_micro_bs_auto_picks_what_an_exhaustive_search_picks(monkeypatch, flags, gib):
    arch, budget, n_train = load_shape("gpt2"), Budget(gib * GiB, f"{gib} GiB"), 48
    cfg = RunConfig(max_seq_len=512, micro_bs="auto", **{"loss": "dpo", **flags})
    plan = auto_batch_plan(cfg, arch, budget, n_train=n_train, method="dpo")
    monkeypatch.setattr(PairReplay, "every_chunk", True)
    m, acc = exhaustive(cfg, arch, budget, n_train)
    assert 1 < m < n_train // (cfg.accum or 1)  # a real choice: neither the first nor the last candidate
    assert (plan.micro_bs, plan.accum) == (m, acc)


def test_the_details_line_of_a_preference_step_describes_its_log_prob_head():
    arch = load_shape("qwen2.5-0.5b")
    C, V, Vp = arch.n_embd, arch.vocab_size, arch.padded_vocab_size
    full = estimate(arch, dpo_setup(RunConfig(max_seq_len=96, loss="dpo"), arch, 3))  # bf16-mixed
    rows = 2 * 3 * 96
    assert not [k for k in full.details if k.startswith("loss:")]  # SFT's fused loss is not this step's
    assert full.details["log-prob head: log-softmax per chunk (fp32)"] == 128 * V * 4
    assert full.details["log-prob head: low-precision logits per chunk"] == 128 * V * 2
    assert full.details["log-prob head: saved response rows + targets"] == rows * C * 4 + rows * 8
    assert full.details["log-prob head: head gradient"] == Vp * C * 4  # fp32 weights: the gradient's dtype
    lora = estimate(arch, dpo_setup(RunConfig(max_seq_len=96, loss="dpo", lora=True,
                                              precision="bf16-true"), arch, 3))
    assert "log-prob head: head gradient" not in lora.details  # a frozen head has none
    assert lora.details["log-prob head: saved response rows + targets"] == rows * C * 2 + rows * 8
    sft = estimate(arch, setup_for(RunConfig(max_seq_len=96), arch, 3))
    assert "loss: saved grad_h + grad_w" in sft.details and not [k for k in sft.details if "log-prob" in k]
