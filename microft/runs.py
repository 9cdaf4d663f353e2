"""Run assembly: turn a resolved RunConfig into a model, datasets and a batch plan, then train.

The CLI calls these; tests call them too, with `list.append` as the event sink.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from microft.config import BatchPlan, RunConfig, resolve_batch_plan
from microft.errors import ConfigError

Event = dict[str, Any]


def batch_plan(cfg: RunConfig, world_size: int = 1) -> BatchPlan:
    micro = cfg.micro_bs if isinstance(cfg.micro_bs, int) else None
    return resolve_batch_plan(micro, cfg.accum, cfg.global_bs, world_size)


def seq_len_for(cfg: RunConfig, n_positions: int) -> int:
    if cfg.max_seq_len is None:
        return n_positions
    if cfg.max_seq_len > n_positions:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's context of {n_positions}")
    return cfg.max_seq_len


def run_pretrain(cfg: RunConfig, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Language-model training on raw text packed into blocks."""
    import torch

    from microft.checkpoint import load_model
    from microft.data import Subset, pack_documents, read_text_corpus, split_indices
    from microft.distributed import distributed, main_only
    from microft.tokenizer import encode
    from microft.trainer import train

    torch.manual_seed(cfg.seed)  # a preset's init depends on --seed alone, the same on every rank
    model = load_model(cfg.model or "gpt2-tiny", dropout=cfg.dropout)
    block = seq_len_for(cfg, model.config.n_positions)
    blocks = pack_documents(read_text_corpus(cfg.data), encode, block)
    train_idx, val_idx = split_indices(len(blocks), cfg.val_frac, cfg.seed)
    with distributed(cfg, model) as dist:  # under torchrun: process group, DDP/FSDP wrap; else a no-op
        plan = batch_plan(cfg, dist.world_size)
        return train(model, Subset(blocks, train_idx), Subset(blocks, val_idx) if val_idx else None, cfg, plan,
                     main_only(on_event, dist), dist=dist)
