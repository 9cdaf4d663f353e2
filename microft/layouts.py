"""Byte layouts shared by the code that allocates tensors and the estimator that counts them (no torch).

Each constant lives here once, so `memory/replay.py` and the optimizer entries (`optimizers.py`) count
exactly what `models/quant.py`, `train/optim8bit.py` and `train/master_adamw.py` allocate, and the analytical
estimator imports no torch.
"""

from __future__ import annotations

# NF4 (QLoRA): 64 weights per block with an fp32 absmax; double quantization stores the absmaxes as
# uint8 codes in blocks of 256 with an fp32 absmax each, plus one fp32 offset.
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256

# 8-bit AdamW: moments as uint8 codes with an fp32 absmax per 256 values; tensors under 4,096 values keep
# fp32 moments; the update walks the state CHUNK elements at a time (a multiple of the block).
ADAMW8_BLOCK = 256
ADAMW8_MIN_NUMEL = 4096
ADAMW8_CHUNK = 1 << 20

# AdamW: parameters whose name holds one of these get no weight decay (biases, norms, embeddings).
NO_DECAY_MARKERS = ("bias", "ln_", "wte", "wpe", "norm")
# MasterAdamW (bf16-true): elements per fp32 working chunk (16 MiB of temporaries).
MASTER_CHUNK = 1 << 20


def nf4_nbytes(numel: int, block: int = NF4_BLOCK, double_quant: bool = False) -> int:
    """Bytes of `quant.quantize_nf4`'s output for `numel` weight elements: packed 4-bit codes + scales."""
    n_blocks = -(-numel // block)
    scales = n_blocks + 4 * -(-n_blocks // DOUBLE_QUANT_BLOCK) + 4 if double_quant else 4 * n_blocks
    return (numel + 1) // 2 + scales
