"""Generation: greedy parity with transformers, cache vs no-cache, sampling controls, streaming."""

from __future__ import annotations

import pytest
import torch

from microft.data.tokenizer import decode, encode, get_encoding
from microft.errors import ConfigError
from microft.generate import generate, generate_text, next_token, stream_text
from microft.models.config import EOT_TOKEN, ModelConfig
from microft.models.transformer import Transformer

SHAPE = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
PROMPT = [464, 2068, 7586, 21831, 18045, 625]  # "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**SHAPE)).eval()


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from microft.models.load import load_model

    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    hf.save_pretrained(tmp_path)
    # eos_token_id=None: transformers would stop at <|endoftext|>; ours is told not to either
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False, pad_token_id=EOT_TOKEN,
                      eos_token_id=None)
    expected = out[0, len(PROMPT):].tolist()
    assert len(expected) == 30
    assert list(generate(load_model(tmp_path), PROMPT, 30, stop_at_eot=False)) == expected


def test_cached_generation_equals_full_recompute(model):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(25):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(generate(model, PROMPT, 25, stop_at_eot=False)) == ids[len(PROMPT):]


def test_seeded_sampling_is_reproducible(model):
    a = list(generate(model, PROMPT, 20, temperature=1.0, seed=11))
    assert a == list(generate(model, PROMPT, 20, temperature=1.0, seed=11))
    assert a != list(generate(model, PROMPT, 20, temperature=1.0, seed=12))


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = list(generate(model, PROMPT, 15))
    assert list(generate(model, PROMPT, 15, temperature=0.8, top_k=1, seed=0)) == greedy
    assert list(generate(model, PROMPT, 15, temperature=0.8, top_p=1e-9, seed=0)) == greedy


def test_next_token_truncation():
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log()
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {next_token(logits, 1.0, generator=g, **kw) for _ in range(300)}  # noqa: E731
    assert draws() == {0, 1, 2}  # token 3 has probability 1e-9
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0}  # the smallest set holding at least top_p of the mass
    assert draws(top_p=0.6) == {0, 1}
    assert draws(top_p=0.95) == {0, 1, 2}
    assert next_token(logits) == 0


def test_stops_when_context_is_full(model):
    prompt = PROMPT * 9  # 54 of 64 positions
    out = list(generate(model, prompt, 100, stop_at_eot=False))
    assert len(out) == SHAPE["n_positions"] - len(prompt)
    with pytest.raises(ConfigError, match="context"):
        generate(model, [1] * SHAPE["n_positions"], 5)


def test_stop_at_eot():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**SHAPE)).eval()
    with torch.no_grad():  # make <|endoftext|> the argmax everywhere
        m.ln_f.weight.zero_()
        m.ln_f.bias.fill_(1.0)
        m.wte.weight[EOT_TOKEN].fill_(1.0)
    assert list(generate(m, PROMPT, 5)) == []
    assert list(generate(m, PROMPT, 5, stop_at_eot=False)) == [EOT_TOKEN] * 5


def test_empty_prompt_starts_from_eot(model):
    with torch.no_grad():
        first = int(model(torch.tensor([[EOT_TOKEN]]))[0, -1].argmax())
    assert next(generate(model, [], 3, stop_at_eot=False)) == first


def test_bad_settings_raise_before_running(model):
    for kwargs in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                   dict(max_new_tokens=-1)):
        with pytest.raises(ConfigError):
            generate(model, PROMPT, **{"max_new_tokens": 5, **kwargs})
    with pytest.raises(ConfigError, match="vocabulary"):
        generate(model, [SHAPE["vocab_size"]], 5)


def test_restores_training_mode_and_leaves_no_inference_mode(model):
    model.train()
    it = generate(model, PROMPT, 3)
    next(it)
    assert not torch.is_inference_mode_enabled()
    assert not model.training
    list(it)
    assert model.training
    model.eval()


def test_stream_text_waits_for_complete_characters():
    text = "naïve café — 世界 🎉🐍 ok"
    ids = encode(text)
    enc = get_encoding()
    partial = [t for t in ids if not _is_utf8(enc.decode_single_token_bytes(t))]
    assert partial, "the test text should split some character across tokens"
    pieces = list(stream_text(ids))
    assert "".join(pieces) == text == decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 1


def test_stream_text_replaces_dangling_bytes():
    ids = encode("🎉")
    pieces = list(stream_text(ids[:-1]))  # the emoji cut short
    assert "".join(pieces) == decode(ids[:-1])


def test_generate_text_decodes_the_generated_tokens(model):
    out = generate_text(model, "Hello", 5, temperature=0.0, stop_at_eot=False)
    ids = list(generate(model, encode("Hello"), 5, temperature=0.0, stop_at_eot=False))
    assert len(ids) == 5 and out == decode(ids)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_runs_under_bf16_autocast_and_in_bf16(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache takes the autocast dtype
        greedy = list(generate(model, PROMPT, 4, temperature=0.0, stop_at_eot=False))
        # the cached path gives the tokens a full forward without a cache gives
        ids = list(PROMPT)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(PROMPT):]
    bf16 = Transformer(ModelConfig(**SHAPE)).to(torch.bfloat16).eval()
    sampled = [list(generate(bf16, PROMPT, 4, temperature=1.0, seed=0, stop_at_eot=False)) for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 4  # seeded sampling repeats in bf16
    assert all(0 <= t < SHAPE["vocab_size"] for t in sampled[0])


def test_sampling_settings_that_mean_nothing_are_refused():
    from microft.errors import ConfigError
    from microft.generate import check_sampling

    for t in (float("nan"), float("inf"), -0.5):  # NaN passed a `< 0` check and sampled garbage
        with pytest.raises(ConfigError, match="--temperature must be a number >= 0"):
            check_sampling(t, None, None)
    check_sampling(0.0, None, None)
    check_sampling(0.7, 40, 0.9)
