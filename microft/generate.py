"""Text generation: greedy or sampled decoding with a KV cache, and UTF-8-safe streaming.

The prompt is run through the model once (prefill) and every new token costs one position.
Generation stops after `max_new_tokens`, at a stop token (`stop_ids`, by default the model's
EOS ids: GPT-2's `<|endoftext|>`; not yielded), or when prompt plus output fill the model's
context: every token is produced with its full history (a model with a sliding window masks
what lies beyond it, as it was trained). The cache holds only the key/value heads. Sampling happens on
the CPU with its own seeded `torch.Generator`, so a seed gives the same text on every run (on the same
device).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from microft.data.tokenizer import Tokenizer, decode_stream, gpt2_tokenizer
from microft.errors import ConfigError
from microft.models.config import EOT_TOKEN, ModelConfig
from microft.models.precision import compute_dtype
from microft.models.transformer import KVCache, Transformer


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError for sampling settings that mean nothing."""
    if not 0 <= temperature < float("inf"):  # NaN fails this too
        raise ConfigError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick a token from one position's logits (V,): argmax at temperature 0, else a sample
    from the temperature-scaled distribution cut to the top-k tokens, then to the top-p mass."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.detach().to("cpu", torch.float32) / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _nucleus(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    # inverse-CDF draw from one uniform number: a few times cheaper than torch.multinomial on CPU
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    tok = int(torch.searchsorted(cdf, u, right=True))
    return min(tok, int((cdf < cdf[-1]).sum()))  # rounding can put u at the very end of the CDF


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until they hold `top_p` of the mass (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(0) - probs >= top_p  # the tokens ranked above already hold top_p
    return logits.index_fill(0, order[drop], float("-inf"))


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """An iterator of new token ids, each yielded as soon as it is produced.

    Generation ends at any of `stop_ids` (default: the model's EOS ids; none if not
    `stop_at_eot`). An empty prompt starts from the BOS token (GPT-2: `<|endoftext|>`, as its
    unconditional samples do). Bad
    settings raise ConfigError here, before anything runs. The model is put in eval mode while
    the iterator runs and restored when it finishes or is closed. Runs in the model's dtype;
    iterate inside `torch.autocast` for mixed precision.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    cfg = model.config
    gpt2_bos = EOT_TOKEN if cfg.model_type == "gpt2" else None
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else gpt2_bos
    if not prompt_ids and bos is None:
        raise ConfigError("an empty prompt needs a BOS token, and this model's config declares none")
    ids = list(prompt_ids) or [bos]
    stops = frozenset(cfg.eos_ids if stop_ids is None else stop_ids) if stop_at_eot else frozenset()
    if len(ids) >= cfg.n_positions:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context is {cfg.n_positions}, "
                          "so it must be shorter")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token {bad[0]} is outside the model's vocabulary of {cfg.vocab_size}")
    steps = min(max_new_tokens, cfg.n_positions - len(ids))
    gen = torch.Generator()  # CPU: the same seed samples the same tokens whatever the model's device
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return _decode(model, ids, steps, temperature, top_k, top_p, gen, stops)


@torch.inference_mode()  # on a generator function torch enters the mode around each step only
def _decode(model: Transformer, ids: list[int], steps: int, temperature: float, top_k: int | None,
            top_p: float | None, gen: torch.Generator, stops: frozenset[int]) -> Iterator[int]:
    if steps <= 0:
        return
    cfg = model.config
    weight = model.head_weight
    device = weight.device
    dtype = compute_dtype(weight)
    # the last generated token is never fed back, so the cache needs one position less
    cache = KVCache.empty(cfg, 1, len(ids) + steps - 1, device, dtype)
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        seq = list(ids)
        for i in range(steps):
            h = model.hidden(x, cache)[0, -1]  # only the last position's logits are needed: (V,)
            logits = model.logits(h)
            tok = next_token(logits, temperature, top_k, top_p, gen)
            if tok in stops:
                return
            yield tok
            seq.append(tok)
            if i + 1 < steps:
                x = torch.tensor([[tok]], dtype=torch.long, device=device)
                if _longrope_switch(cfg, cache.length, len(seq)):
                    cache.length = 0  # every key again, rotated with the long factors (as transformers does)
                    x = torch.tensor([seq], dtype=torch.long, device=device)
    finally:
        model.train(was_training)


def _longrope_switch(cfg: ModelConfig, cached: int, length: int) -> bool:
    """Whether LongRoPE's long factors take over at this step: the sequence has just grown past the original
    context, so the cached keys (rotated with the short factors) are recomputed, as Phi-3's generation
    does."""
    lr = cfg.longrope
    return lr is not None and length > lr.original_max_position_embeddings >= cached


def stream_text(token_ids: Iterable[int], tokenizer: Tokenizer | None = None) -> Iterator[str]:
    """Decode tokens incrementally, yielding only complete characters (`tokenizer.decode_stream`).

    A token can end in the middle of a multi-byte UTF-8 character; those bytes wait for the next
    token. Invalid bytes become U+FFFD, as `decode` does. `tokenizer` defaults to GPT-2's.
    """
    return decode_stream(tokenizer or gpt2_tokenizer(), token_ids)


def generate_text(model: Transformer, prompt: str, max_new_tokens: int, tokenizer: Tokenizer | None = None,
                  **kwargs) -> str:
    """The completion of `prompt` as one string; `kwargs` go to `generate`. With a `tokenizer` other
    than GPT-2's, its BOS is put first when it adds one."""
    tok = tokenizer or gpt2_tokenizer()
    ids = generate(model, tok.prefix + tok.encode(prompt), max_new_tokens, **kwargs)
    return "".join(stream_text(ids, tok))
