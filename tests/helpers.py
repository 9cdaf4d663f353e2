"""Small shared builders for the tests: seeded tiny models, synthetic data, an interrupting callback."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from typing import Any

import torch

from microft.config import RunConfig
from microft.models.config import IGNORE_INDEX, ModelConfig
from microft.models.transformer import Transformer

TINY = ModelConfig(name="test-tiny", vocab_size=512, n_layer=2, n_head=2, n_embd=32, n_positions=64)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def masked_samples(n: int, seed: int = 0, min_len: int = 6, max_len: int = 40, vocab: int = 500,
                   weights: bool = False) -> list[dict]:
    """Variable-length samples whose first part (the 'prompt') is masked with -100."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(min_len, max_len)
        toks = [rng.randrange(vocab) for _ in range(L + 1)]
        prompt = rng.randint(1, L - 1)
        labels = [IGNORE_INDEX] * prompt + toks[prompt + 1 :]
        out.append({"input_ids": toks[:-1], "labels": labels,
                    "weight": rng.choice([0.5, 1.0, 3.0]) if weights else 1.0})
    return out


def run_config(tmp_path, **kw) -> RunConfig:
    base = dict(out=str(tmp_path), precision="fp32", device="cpu", seed=7, lr=1e-2, warmup=0,
                eval_every=0, log_format="plain", group_by_length=True)
    base.update(kw)
    return RunConfig(**base)


def flat_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sigint_at_step(step: int) -> Callable[[dict[str, Any]], None]:
    """An event callback that sends this process SIGINT once `step` is done (Ctrl-C mid-run)."""

    def on_event(e: dict[str, Any]) -> None:
        if e["kind"] == "step" and e["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_event
