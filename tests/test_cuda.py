"""CUDA paths: the fp16 grad scaler, TF32, and the memory estimate against max_memory_allocated.

Every test here needs a CUDA device and is skipped cleanly without one (`-m gpu` selects them).
"""

from __future__ import annotations

import pytest
import torch

from microft.config import BatchPlan, RunConfig
from microft.memory.estimate import estimate, setup_for, with_dropout
from microft.models.config import ModelConfig
from microft.models.transformer import Transformer
from microft.train.loop import train
from microft.train.optim import build_optimizer
from microft.train.step import autocast_context, finish_step, make_scaler, micro_step
from tests.helpers import masked_samples, run_config, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]


def test_fp16_mixed_trains_with_a_live_scaler_and_tf32_follows_the_flag(tmp_path):
    events: list[dict] = []
    cfg = run_config(tmp_path, device="cuda", precision="fp16-mixed", max_steps=6, lr=1e-3, tf32=False)
    train(tiny_model(), masked_samples(32, seed=5), None, cfg, BatchPlan(micro_bs=4, accum=2), events.append)
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert torch.backends.cuda.matmul.allow_tf32 is False
    state = torch.load(tmp_path / "checkpoints" / "step-0000006" / "train_state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0
    train(tiny_model(), masked_samples(32, seed=5), None,
          run_config(tmp_path / "b", device="cuda", max_steps=1), BatchPlan(micro_bs=4, accum=1))
    assert torch.backends.cuda.matmul.allow_tf32 is True


@pytest.mark.parametrize("precision,grad_ckpt",
                         [("fp32", False), ("bf16-mixed", False), ("bf16-mixed", True)])
def test_estimate_is_within_5_percent_of_max_memory_allocated(precision, grad_ckpt):
    """Two real optimizer steps of GPT-2 124M on the GPU against the analytical replay of the same step."""
    micro_bs, seq = 4, 512
    mcfg = ModelConfig.from_preset("gpt2")
    cfg = RunConfig(precision=precision, grad_ckpt=grad_ckpt, max_seq_len=seq)
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = Transformer(mcfg).to(device).train()
    if grad_ckpt:
        from microft.models.transformer import set_grad_checkpointing

        set_grad_checkpointing(model, True)
    opt = build_optimizer(model, cfg, device)
    scaler, autocast = make_scaler(precision, device), autocast_context(precision, device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        x = torch.randint(0, mcfg.vocab_size, (micro_bs, seq), device=device)
        micro_step(model, x, x.clone(), None, float(micro_bs * seq), autocast, scaler)
        finish_step(model, opt, scaler, cfg.max_grad_norm)  # as train() does
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    predicted = estimate(with_dropout(mcfg), setup_for(cfg, with_dropout(mcfg), micro_bs)).peak_bytes
    assert abs(predicted - measured) <= 0.05 * measured, f"estimate {predicted:,} vs measured {measured:,}"
