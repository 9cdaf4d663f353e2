"""Reading Hugging Face GPT-2 directories in their key layouts, and exporting back to transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from microft.errors import CheckpointError  # noqa: E402
from microft.models.config import ModelConfig  # noqa: E402
from microft.models.hf import export_hf  # noqa: E402
from microft.models.load import load_hf_state, load_model, model_state_dict  # noqa: E402
from microft.models.transformer import Transformer  # noqa: E402

SHAPE = dict(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture
def hf(tmp_path):
    """A random tiny GPT2LMHeadModel saved with save_pretrained (the `transformer.` layout)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def tokens(n: int = 10) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, n), generator=torch.Generator().manual_seed(7))


def assert_same_logits(hf_model, ours) -> None:
    x = tokens()
    with torch.no_grad():
        diff = (hf_model(x).logits - ours.eval()(x)).abs().max().item()
    assert diff <= 1e-5


def hub_layout(src_dir, dst_dir, lm_head: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The original openai-community/gpt2 upload's keys: no prefix, causal-mask buffers saved."""
    saved = load_file(str(src_dir / "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in saved.items()}
    ctx = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if lm_head is not None:
        state["lm_head.weight"] = lm_head
    dst_dir.mkdir()
    (dst_dir / "config.json").write_text((src_dir / "config.json").read_text())
    return state


def test_save_pretrained_layout_loads(hf):
    model, d = hf
    state = load_hf_state(d)
    assert "wte.weight" in state and "h.1.mlp.c_fc.weight" in state
    assert state["h.0.attn.c_attn.weight"].shape == (3 * 32, 32)  # nn.Linear (out, in)
    assert state["h.0.mlp.c_proj.weight"].shape == (32, 4 * 32)
    assert not any(k.startswith("transformer.") or k.endswith(".attn.bias") for k in state)
    assert_same_logits(model, load_model(d))


def test_hub_layout_with_buffers_and_tied_head_loads(hf, tmp_path):
    model, d = hf
    wte = model.transformer.wte.weight.detach().clone()
    state = hub_layout(d, tmp_path / "hub", lm_head=wte)
    save_file(state, str(tmp_path / "hub" / "model.safetensors"))
    assert_same_logits(model, load_model(tmp_path / "hub"))


def test_pytorch_model_bin_loads(hf, tmp_path):
    model, d = hf
    torch.save(hub_layout(d, tmp_path / "bin"), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_logits(model, load_model(tmp_path / "bin"))


def test_safetensors_preferred_over_bin(hf, tmp_path):
    model, d = hf
    (d / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert_same_logits(model, load_model(d))


def test_untied_head_is_refused(hf, tmp_path):
    model, d = hf
    state = hub_layout(d, tmp_path / "untied", lm_head=torch.randn(SHAPE["vocab_size"], SHAPE["n_embd"]))
    save_file(state, str(tmp_path / "untied" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="untied"):
        load_model(tmp_path / "untied")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights_raise_checkpoint_error(hf, tmp_path, name):
    _, d = hf
    (d / "model.safetensors").unlink()
    src = tmp_path / "good.bin"
    torch.save({"wte.weight": torch.zeros(3, 3)}, src)
    good = src.read_bytes()
    (d / name).write_bytes(good[: len(good) // 2] if name.endswith(".bin") else b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt weights file") as e:
        load_model(d)
    assert "\n" not in str(e.value)


def test_missing_weights_raise_checkpoint_error(hf):
    _, d = hf
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf_state(d)


def test_missing_tensor_raises_checkpoint_error(hf):
    _, d = hf
    state = load_file(str(d / "model.safetensors"))
    del state["transformer.h.1.ln_2.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(d)


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
    torch.manual_seed(1)
    ours = Transformer(ModelConfig(**SHAPE)).eval()
    out = export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in saved and all(k.startswith("transformer.") for k in saved)
    assert saved["transformer.wte.weight"].shape == (SHAPE["vocab_size"], SHAPE["n_embd"])  # unpadded
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    assert_same_logits(model.eval(), ours)


def test_export_roundtrip_is_exact(tmp_path):
    torch.manual_seed(2)
    ours = Transformer(ModelConfig(**SHAPE))
    export_hf(ours, tmp_path / "x")
    assert json.loads((tmp_path / "x" / "config.json").read_text())["model_type"] == "gpt2"
    back = model_state_dict(load_model(tmp_path / "x"))
    for k, v in model_state_dict(ours).items():
        assert torch.equal(back[k], v), k


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path):
    ours = Transformer(ModelConfig(**SHAPE))
    out = tmp_path / "out"
    out.mkdir()
    export_hf(ours, out)  # an empty directory is fine
    with pytest.raises(CheckpointError, match="--force"):
        export_hf(ours, out)
    (out / "stale.txt").write_text("old")
    export_hf(ours, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_export_refuses_unmerged_lora(tmp_path):
    ours = Transformer(ModelConfig(**SHAPE))
    ours.h[0].attn.c_attn.lora_A = torch.nn.Parameter(torch.zeros(4, 32))  # stands in for an adapter
    with pytest.raises(CheckpointError, match="merge"):
        export_hf(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("activation_function", "relu"), ("activation_function", "gelu"),
                                          ("scale_attn_weights", False),
                                          ("scale_attn_by_inverse_layer_idx", True)])
def test_gpt2_switches_microft_does_not_run_are_refused_not_ignored(tmp_path, field, value):
    """These change transformers' logits (by 0.003-8 on a tiny model): loading them as plain GPT-2 would
    train and export a different model without a word."""
    from microft.errors import ConfigError
    from microft.models.load import read_model_config

    transformers.GPT2Config(**SHAPE, **{field: value}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"{field}={value!r} are not supported"):
        read_model_config(tmp_path)
    transformers.GPT2Config(**SHAPE, activation_function="gelu_pytorch_tanh").save_pretrained(tmp_path)
    assert read_model_config(tmp_path).n_layer == SHAPE["n_layer"]  # the same tanh-GELU by another name


def test_gpt2_special_ids_survive_load_and_export(tmp_path):
    """A GPT-2 of a small vocabulary keeps its own bos/eos ids through load and export (export used to write
    50256, outside its vocabulary); without ids, only a vocabulary that has <|endoftext|> gets 50256."""
    torch.manual_seed(0)
    small = dict(SHAPE, vocab_size=300)
    config = transformers.GPT2Config(**small, bos_token_id=1, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    assert (ours.config.bos_token_id, ours.config.eos_token_id) == (1, 0)
    cfg = json.loads((export_hf(ours, tmp_path / "out") / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0)
    bare = ModelConfig(**small).to_hf()
    assert bare["bos_token_id"] is None and bare["eos_token_id"] is None
    assert ModelConfig(**SHAPE).to_hf()["eos_token_id"] == 50256


def test_bad_model_configs_name_the_file_and_the_reason(tmp_path):
    from microft.errors import ConfigError
    from microft.models.load import read_model_config

    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^.*empty\.json is not a valid gpt2 config: it has no 'n_embd'$"):
        read_model_config(tmp_path / "empty.json")
    (tmp_path / "l0.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 0,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 128}))
    want = r"l0\.json is not a valid llama config: n_layer input should be greater than 0$"
    with pytest.raises(ConfigError, match=want):
        read_model_config(tmp_path / "l0.json")
    llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 128}
    for key, bad in [("num_hidden_layers", "abc"), ("rms_norm_eps", "x"), ("rope_scaling", "x"),
                     ("num_attention_heads", 0)]:
        (tmp_path / "bad.json").write_text(json.dumps({**llama, key: bad}))
        with pytest.raises(ConfigError, match=r"bad\.json is not a valid llama config: \S"):
            read_model_config(tmp_path / "bad.json")
