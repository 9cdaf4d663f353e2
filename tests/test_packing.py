"""--packing: whole samples in rows, positions restarting per sample, attention confined to each
sample, so loss and gradients equal the unpacked batch's; the step's samples never change."""

from __future__ import annotations

import pytest
import torch

from microft.config import BatchPlan
from microft.data.batches import collate, collate_packed, pack_rows, packed_micro_batches, sample_length
from microft.errors import DataError, Interrupted
from microft.models.config import ModelConfig
from microft.models.transformer import (
    Transformer,
    packed_attention_mask,
    packed_segments,
    rope_cos_sin,
    segment_attention,
    set_grad_checkpointing,
)
from microft.train.loop import step_batches, train
from tests.helpers import TINY, flat_params, masked_samples, run_config, sigint_at_step, tiny_model

LLAMA = ModelConfig.from_preset("llama-tiny")
SWA = ModelConfig.from_preset("mistral-tiny").model_copy(update={"sliding_window": 8})


def tr_rope(pos):
    return rope_cos_sin(LLAMA, 0, pos.size(1), pos.device, pos)


def _loss_and_grads(model, batch, positions=True):
    model.zero_grad(set_to_none=True)
    kw = {"position_ids": batch.position_ids} if positions else {}
    loss = model(batch.input_ids, batch.labels, batch.weights, target_pos=batch.target_pos, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [TINY, LLAMA, SWA], ids=["gpt2", "llama", "mistral-window"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("segments", [True, False], ids=["per-sample", "mask"])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(cfg, ckpt, segments, monkeypatch):
    """Per-sample attention (a CPU's default) and the block-diagonal mask (CUDA's; a window longer
    than the row's samples) both give the unpacked batch's loss and gradients."""
    import microft.models.transformer as tr

    calls = []
    monkeypatch.setattr(tr, "segment_attention", lambda *a: calls.append(1) or segment_attention(*a))
    samples = masked_samples(12, seed=11, min_len=4, max_len=30, weights=True)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.kernels.cpu_packed_segments = segments
    set_grad_checkpointing(model, ckpt)
    ref_loss, ref_grads = _loss_and_grads(model, collate(samples), positions=False)
    lengths = [sample_length(s) for s in samples]
    rows = pack_rows(list(range(len(samples))), lengths, 48)
    assert len(rows) < len(samples) and sorted(i for r in rows for i in r) == list(range(len(samples)))
    packed = collate_packed([[samples[i] for i in r] for r in rows])
    assert packed.input_ids.size(1) <= 48
    loss, grads = _loss_and_grads(model, packed)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4), n
    assert bool(calls) == (segments and cfg.sliding_window is None)  # the window (8) is shorter than the rows


def test_packed_segments_are_each_rows_sample_lengths():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 0, 0, 1]])
    assert packed_segments(pos) == ([3, 2, 1], [6], [1, 2, 1, 2])


def test_per_sample_attention_in_bf16_equals_the_masked_call():
    """bf16 on a CPU: short samples take the plain-op attention, as unpacked rows do; same values as
    the mask."""
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]])
    model = Transformer(LLAMA).to(torch.bfloat16)
    attn = model.h[0].attn
    x = torch.randn(2, 12, LLAMA.n_embd, dtype=torch.bfloat16)
    rope = tr_rope(pos)
    by_sample = attn(x, rope, packed=packed_segments(pos))
    masked = attn(x, rope, packed=packed_attention_mask(pos))
    torch.testing.assert_close(by_sample, masked, rtol=2e-2, atol=2e-2)


def test_packed_rows_restart_positions_and_never_exceed_the_row_length():
    samples = masked_samples(20, seed=2, max_len=40)
    lengths = [sample_length(s) for s in samples]
    rows = pack_rows(list(range(20)), lengths, 64)
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    b = collate_packed([[samples[i] for i in r] for r in rows])
    row0 = rows[0]
    expect = [p for i in row0 for p in range(lengths[i])]
    assert b.position_ids[0, : len(expect)].tolist() == expect
    assert b.input_ids[0, : len(expect)].tolist() == [t for i in row0 for t in samples[i]["input_ids"]]
    with pytest.raises(DataError, match="more than the packed row length"):
        pack_rows([0], [65], 64)


def test_packing_rearranges_a_steps_samples_and_rows_do_not_depend_on_the_micro_batch():
    samples = masked_samples(64, seed=5)
    lengths = [sample_length(s) for s in samples]
    for step in range(4):
        _, plain_idx = step_batches(step, 64, lengths, BatchPlan(micro_bs=2, accum=4), 7, True)
        rows_by_mbs = {}
        for mbs in (1, 2, 8):
            plan = BatchPlan(micro_bs=mbs, accum=8 // mbs)
            mb, idx = step_batches(step, 64, lengths, plan, 7, True, pack_len=64)
            assert idx == plain_idx  # the same samples form the step
            assert sorted(i for m in mb for r in m for i in r) == sorted(idx)
            assert all(len(m) <= mbs for m in mb)
            rows_by_mbs[mbs] = [r for m in mb for r in m]
        assert rows_by_mbs[1] == rows_by_mbs[2] == rows_by_mbs[8]


def test_every_rank_gets_a_share_of_the_packed_step():
    lengths = [3] * 16
    mbs = packed_micro_batches(list(range(16)), lengths, 1, 64, world_size=4)
    shares = [[i for m in mbs[r::4] for row in m for i in row] for r in range(4)]
    assert all(len(s) == 4 for s in shares) and sorted(sum(shares, [])) == list(range(16))


def _train(out, samples, micro_bs, accum, steps=3, model=None, **kw):
    model = model or tiny_model()
    cfg = run_config(out, max_steps=steps, **{"packing": True, "max_seq_len": 64, **kw})
    events: list[dict] = []
    train(model, samples, None, cfg, BatchPlan(micro_bs=micro_bs, accum=accum), events.append)
    return model, [e["loss"] for e in events if e["kind"] == "step"]


def test_packed_training_matches_unpacked_and_any_split(tmp_path):
    samples = masked_samples(64, seed=1, weights=True)
    ref_model, ref_loss = _train(tmp_path / "plain", samples, 8, 1, packing=False, lr=1e-3)
    for mb, acc in [(1, 8), (2, 4), (8, 1)]:
        model, losses = _train(tmp_path / f"{mb}x{acc}", samples, mb, acc, lr=1e-3)
        assert losses == pytest.approx(ref_loss, abs=1e-5), (mb, acc)
        for name, w in flat_params(ref_model).items():
            assert torch.allclose(model.state_dict()[name], w, atol=1e-5, rtol=0), (mb, acc, name)


def test_packed_resume_after_sigint_matches_an_uninterrupted_run(tmp_path):
    samples = masked_samples(48, seed=3)
    ref_model, ref_loss = _train(tmp_path / "ref", samples, 2, 2, steps=6)
    out = tmp_path / "cut"

    cfg = run_config(out, max_steps=6, packing=True, max_seq_len=64)
    with pytest.raises(Interrupted):
        train(tiny_model(), samples, None, cfg, BatchPlan(micro_bs=2, accum=2), sigint_at_step(3))
    resumed = tiny_model(seed=99)
    events: list[dict] = []
    train(resumed, samples, None, cfg.model_copy(update={"resume": "auto"}), BatchPlan(micro_bs=2, accum=2),
          events.append)
    assert [e["loss"] for e in events if e["kind"] == "step"] == ref_loss[3:]
    for k, v in flat_params(ref_model).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_the_estimator_counts_the_packed_attention_mask():
    from dataclasses import replace

    from microft.config import RunConfig
    from microft.memory.estimate import estimate, load_shape, setup_for

    arch = load_shape("gpt2-tiny")
    deltas = {}
    for T in (128, 256):
        base = setup_for(RunConfig(precision="bf16-mixed", max_seq_len=T), arch, 4)
        assert not base.packing and setup_for(RunConfig(max_seq_len=T, packing=True), arch, 4).packing
        deltas[T] = estimate(arch, replace(base, packing=True)).peak_bytes - estimate(arch, base).peak_bytes
        # the boolean mask, plus the additive bf16 bias CUDA's SDPA keeps for each layer's backward
        assert deltas[T] >= 4 * T * T * (1 + 2 * arch.n_layer)
    assert 3.5 < deltas[256] / deltas[128] < 4.5  # quadratic in the row length
