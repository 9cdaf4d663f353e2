"""Compatibility re-exports: the model lives in `microft.models` (transformer, loss, precision)."""

from microft.models.loss import (  # noqa: F401
    HeadGradLink,
    _FusedCrossEntropy,
    _TiedEmbedding,
    fused_cross_entropy,
    tied_embedding,
)
from microft.models.precision import autocast_off, autocasting, compute_dtype  # noqa: F401
from microft.models.transformer import (  # noqa: F401
    CPU_MATH_ATTN_MAX_LEN,
    GPT,
    MLP,
    Attention,
    Block,
    KVCache,
    Transformer,
    _GeluLinear,
    causal_attention_math,
    gelu_linear,
    set_grad_checkpointing,
)

CausalSelfAttention = Attention
