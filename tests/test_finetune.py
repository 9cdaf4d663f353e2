"""`microft finetune` end to end on CPU: data → training → checkpoints, LoRA adapters, predictions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from microft.cli import app

runner = CliRunner()


def alpaca_file(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "red green blue cat dog sun moon tree".split()
    recs = []
    for i in range(n):
        ws = [rng.choice(words) for _ in range(3)]
        rec = {"instruction": "Reverse the words.", "input": " ".join(ws), "output": " ".join(reversed(ws))}
        if i % 3 == 0:
            rec = {"instruction": f"Say {ws[0]} twice.", "output": f"{ws[0]} {ws[0]}"}
        recs.append(rec)
    path.write_text(json.dumps(recs))
    return path


def finetune(tmp_path: Path, *extra: str):
    data = alpaca_file(tmp_path / "data.json")
    args = ["finetune", "--model", "gpt2-tiny", "--data", str(data), "--out", str(tmp_path / "out"),
            "--micro-bs", "2", "--accum", "2", "--max-steps", "4", "--eval-every", "2", "--lr", "3e-3",
            "--log-format", "plain", "--max-seq-len", "64", *extra]
    return runner.invoke(app, args)


def test_full_finetune_writes_checkpoints_metrics_and_predictions(tmp_path):
    res = finetune(tmp_path, "--test-frac", "0.1", "--predict", "--val-frac", "0.2")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert (out / "final" / "model.safetensors").exists()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in recs) >= 2
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all({"prompt", "reference", "prediction"} <= set(p) for p in preds)
    assert "### Response:" in preds[0]["prompt"]
    assert "sample  step" in res.output  # fixed val prompts → responses at each eval


def test_lora_finetune_keeps_base_bit_identical_and_adapters_load_for_generate_and_merge(tmp_path):
    from microft.models.artifacts import load_any
    from microft.models.load import load_model, model_state_dict

    res = finetune(tmp_path, "--lora", "--lora-r", "4", "--lora-targets", "all", "--seed", "3")
    assert res.exit_code == 0, res.output
    final = tmp_path / "out" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    torch.manual_seed(3)  # the preset's init under the run's seed: the base the adapters were trained on
    base = load_model("gpt2-tiny")
    saved = load_model(final)  # plain load: base weights only
    for k, v in model_state_dict(base).items():
        assert torch.equal(v, model_state_dict(saved)[k]), k
    tuned = load_any(str(final))
    x = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(tuned(x), saved(x))  # the adapters do something
    res = runner.invoke(app, ["merge", "--model", str(final), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(x), tuned(x), atol=1e-5)
    res = runner.invoke(app, ["generate", "--model", str(final), "--prompt", "red", "--max-new-tokens", "4",
                              "--temperature", "0", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "--model", str(final), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf" / "config.json").exists()
    # training from the LoRA run's weights would read the base beside the adapters and drop them: refused
    res = runner.invoke(app, ["finetune", "--model", str(final), "--data", str(tmp_path / "data.json"),
                              "--out", str(tmp_path / "again"), "--max-steps", "1"])
    assert res.exit_code == 2, res.output
    assert "holds LoRA adapters: fold them into a model first" in res.output, res.output
    assert not (tmp_path / "again").exists()
    adapters_only = tmp_path / "adapters"
    adapters_only.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (adapters_only / f).write_bytes((final / f).read_bytes())
    res = runner.invoke(app, ["estimate-mem", "--model", str(adapters_only)])
    assert res.exit_code == 2 and "holds LoRA adapters, not a whole model" in res.output, res.output


@pytest.mark.parametrize("content, message", [
    (b'[{"instruction": "a", "output": "b"}, {"instruction": "c"', "data.json"),
    (b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "output"),
    (b'[{"instruction": "a", "output": 3}]', "output"),
    (b"", "empty"),
    (b'[{"instruction": "caf\xe9", "output": "b"}]', "UTF-8"),
])
def test_bad_data_is_refused_with_one_line_and_nothing_written(tmp_path, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    bad = tmp_path / "data.json"
    bad.write_bytes(content)
    res = runner.invoke(app, ["finetune", "--model", "gpt2-tiny", "--data", str(bad), "--out", str(out),
                              "--max-steps", "1"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert message.lower() in lines[0].lower(), res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
