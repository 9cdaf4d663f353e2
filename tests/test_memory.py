"""estimate-mem: the analytical engine against the traced step, the planner, budgets, the CLI.

The accuracy grid runs microft's real training step (two optimizer steps, on fake tensors) for
each configuration and checks the analytical replay lands within 3 % of its peak.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microft.cli import app
from microft.config import BatchPlan, RunConfig
from microft.errors import ConfigError
from microft.memory.estimate import (
    Budget,
    estimate,
    load_shape,
    parse_budget,
    setup_for,
    trace,
    with_dropout,
)
from microft.memory.plan import StrategyFit, auto_batch_plan, estimate_for_run, fit_budget, step_cost
from microft.memory.replay import Replay
from microft.models.config import ModelConfig

TOLERANCE = 0.03

# (model, micro-batch, seq len, precision, other RunConfig fields, accumulation)
GRID = [
    ("gpt2-tiny", 1, 16, "fp32", {}, 1),
    ("gpt2-tiny", 1, 16, "fp32", {"optimizer": "adafactor"}, 1),
    ("gpt2-tiny", 1, 16, "fp32", {"optimizer": "sgd"}, 2),
    ("gpt2-tiny", 2, 64, "bf16-mixed", {}, 1),
    ("gpt2-tiny", 4, 128, "fp16-mixed", {}, 2),
    ("gpt2-tiny", 8, 128, "bf16-true", {}, 1),
    ("gpt2-tiny", 4, 64, "fp32", {"grad_ckpt": True}, 1),
    ("gpt2-tiny", 8, 128, "bf16-mixed", {"grad_ckpt": True}, 1),
    ("gpt2-tiny", 2, 128, "fp32", {"lora": True}, 1),
    ("gpt2-tiny", 4, 128, "bf16-mixed", {"lora": True, "lora_targets": "all", "lora_r": 4}, 2),
    ("gpt2-tiny", 4, 64, "fp32", {"optimizer": "adamw-8bit"}, 1),
    ("gpt2-tiny", 4, 128, "fp32", {"dropout": 0.1}, 1),
    ("gpt2-mini", 4, 256, "fp32", {}, 1),
    ("gpt2-mini", 4, 256, "bf16-mixed", {}, 2),
    ("gpt2-mini", 2, 512, "fp16-mixed", {"grad_ckpt": True}, 1),
    ("gpt2-mini", 4, 256, "bf16-mixed", {"grad_ckpt": True, "grad_ckpt_every": 2}, 1),
    ("gpt2-mini", 2, 256, "bf16-true", {"grad_ckpt": True}, 1),
    ("gpt2-mini", 2, 512, "fp32", {"lora": True}, 1),
    ("gpt2-mini", 4, 256, "bf16-mixed", {"lora": True, "grad_ckpt": True}, 1),
    ("gpt2-mini", 2, 128, "bf16-true", {"lora": True, "lora_targets": "attn,mlp", "lora_r": 16}, 1),
    ("gpt2-mini", 2, 64, "fp32", {"optimizer": "adafactor"}, 1),
    ("gpt2-mini", 4, 256, "bf16-mixed", {"optimizer": "adamw-8bit", "grad_ckpt": True}, 1),
    ("gpt2-mini", 2, 256, "bf16-mixed", {"dropout": 0.1, "lora": True, "lora_dropout": 0.05}, 1),
    ("gpt2-mini", 1, 32, "fp32", {"optimizer": "sgd", "weight_decay": 0.0}, 1),
]
# a small vocabulary moves the peak out of the loss: into backward and the optimizer step
SMALL_VOCAB = ModelConfig(name="small-vocab", vocab_size=256, n_positions=256, n_embd=128, n_layer=3,
                          n_head=4)
SMALL_GRID = [
    (8, 256, "fp32", {"grad_ckpt": True}, 1, "start of backward"),
    (16, 256, "bf16-mixed", {"grad_ckpt": True}, 2, "start of backward"),
    (1, 8, "fp32", {}, 1, "end of backward"),
    (1, 8, "fp32", {"optimizer": "adafactor"}, 1, "optimizer step"),
]


def _both(arch, cfg: RunConfig, micro_bs: int, accum: int):
    s = setup_for(cfg, arch, micro_bs, accum=accum)
    return estimate(arch, s), trace(arch, s, max_grad_norm=cfg.max_grad_norm)


def _check(a, t) -> None:
    err = (a.peak_bytes - t.peak_bytes) / t.peak_bytes
    assert abs(err) <= TOLERANCE, \
        f"analytical {a.peak_bytes:,} vs traced {t.peak_bytes:,} ({100 * err:+.2f}%)"
    for e in (a, t):
        assert sum(e.components.values()) == e.peak_bytes
        assert e.step_peaks and max(e.step_peaks) == e.peak_bytes


@pytest.mark.parametrize("model,micro_bs,seq,precision,kw,accum", GRID,
                         ids=[f"{m}-mb{b}-T{t}-{p}-{'-'.join(f'{k}={v}' for k, v in kw.items())}-acc{a}"
                              for m, b, t, p, kw, a in GRID])
def test_analytical_matches_trace(model, micro_bs, seq, precision, kw, accum):
    cfg = RunConfig(precision=precision, max_seq_len=seq, **kw)
    _check(*_both(load_shape(model, cfg.dropout), cfg, micro_bs, accum))


@pytest.mark.parametrize("micro_bs,seq,precision,kw,accum,phase", SMALL_GRID)
def test_analytical_matches_trace_outside_the_loss(micro_bs, seq, precision, kw, accum, phase):
    cfg = RunConfig(precision=precision, max_seq_len=seq, **kw)
    a, t = _both(with_dropout(SMALL_VOCAB), cfg, micro_bs, accum)
    _check(a, t)
    assert a.peak_phase == phase


def test_fast_replay_gives_the_full_peak():
    arch = load_shape("gpt2-mini")
    for kw, acc in [({}, 1), ({"grad_ckpt": True}, 3), ({"optimizer": "sgd"}, 2), ({"lora": True}, 1)]:
        s = setup_for(RunConfig(precision="bf16-mixed", max_seq_len=128, **kw), arch, 4, accum=acc)
        full, fast = Replay(arch, s), Replay(arch, s)
        assert full.run().peak == fast.run(fast=True).peak


def test_first_step_creates_the_optimizer_state():
    arch = load_shape("gpt2-tiny")
    e = estimate(arch, setup_for(RunConfig(precision="fp32", max_seq_len=16), arch, 1))
    assert e.step_peaks[0] < e.step_peaks[1]  # step 2 runs with Adam's two moments already there
    assert e.details["optimizer state"] >= 2 * e.details["gradients"]


def test_components_react_to_the_switches():
    arch = load_shape("gpt2")
    base = setup_for(RunConfig(precision="fp32", max_seq_len=1024), arch, 8)
    peak = estimate(arch, base).peak_bytes
    assert estimate(arch, replace(base, grad_ckpt=True)).peak_bytes < peak
    assert estimate(arch, replace(base, precision="bf16-mixed")).peak_bytes < peak
    assert estimate(arch, replace(base, optimizer="adamw-8bit")).peak_bytes < peak
    lora = estimate(arch, replace(base, lora=True))
    assert "optimizer state" in lora.components and lora.components["optimizer state"] < 10 * 2**20
    ddp = estimate(arch, base, world=2, shard="ddp")
    assert ddp.components["DDP gradient buckets"] == ddp.details["gradients"]


@pytest.mark.parametrize("spec,expected", [
    ("18GiB", 18 * 2**30), ("24GB", 24 * 10**9), ("16G", 16 * 2**30), ("512MiB", 512 * 2**20),
    ("rtx3090", 24576 * 2**20), ("A100-40GB", 40960 * 2**20), ("h100", 81559 * 2**20), ("1000b", 1000),
])
def test_parse_budget(spec, expected):
    assert parse_budget(spec).bytes == expected


@pytest.mark.parametrize("spec", ["lots", "-3GB", "0", "12 parsecs"])
def test_parse_budget_rejects(spec):
    with pytest.raises(ConfigError):
        parse_budget(spec)


def test_t4_has_no_bf16():
    assert not parse_budget("t4").bf16 and parse_budget("rtx4090").bf16


def test_plan_picks_the_largest_micro_batch_that_fits():
    arch = load_shape("gpt2")
    budget = parse_budget("t4")
    base = setup_for(RunConfig(precision="fp32", max_seq_len=1024), arch, 1)
    p = fit_budget(arch, base, budget, global_bs=32)
    assert len(p.strategies) >= 5 and p.recommended is not None
    for row in p.strategies + p.tree:
        if not row.fits:
            continue
        assert row.micro_bs * row.accum == 32 and row.total_bytes <= budget.bytes
        bigger = [m for m in range(row.micro_bs + 1, 33) if 32 % m == 0]
        if bigger:  # the next size up does not fit
            up = estimate(arch, replace(row.setup, micro_bs=bigger[0], accum=min(32 // bigger[0], 2)), budget)
            assert not up.fits
    ckpt = next(r for r in p.strategies if "ckpt" in r.strategy)
    assert ckpt.micro_bs >= p.strategies[1].micro_bs  # checkpointing never lowers the micro-batch


def test_auto_batch_plan_and_estimate_for_run():
    mc = ModelConfig.from_preset("gpt2")
    cfg = RunConfig(precision="bf16-mixed", global_bs=64, max_seq_len=1024, micro_bs="auto")
    bp = auto_batch_plan(cfg, with_dropout(mc), Budget(24 * 2**30, "24 GiB"))
    mb = bp.micro_bs
    assert 64 % mb == 0 and mb >= 4 and bp.accum == 64 // mb
    info = estimate_for_run(cfg, mc, BatchPlan(micro_bs=mb, accum=64 // mb))
    assert info["fits"] is None and info["peak_bytes"] > 0 and "GiB" in info["summary"]
    over = estimate(with_dropout(mc), setup_for(cfg, with_dropout(mc), 128), Budget(24 * 2**30, "24 GiB"))
    assert not over.fits
    with pytest.raises(ConfigError, match="does not fit"):
        auto_batch_plan(cfg, with_dropout(mc), Budget(2**30, "1 GiB"))


LLAMA_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}


def test_llama_7b_config_gets_a_fast_answer_and_a_24gb_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    t0 = time.perf_counter()
    arch = load_shape(str(tmp_path))
    base = setup_for(RunConfig(precision="bf16-mixed", max_seq_len=2048), arch, 1)
    e = estimate(arch, base)
    p = fit_budget(arch, base, parse_budget("24GB"), global_bs=32)
    assert time.perf_counter() - t0 < 10.0  # loose (shared CI cores); ~0.8 s measured when idle
    assert 6.5e9 < e.details["parameters"] < 7e9
    assert e.peak_bytes > 100 * 2**30  # full fine-tuning: fp32 weights, grads and Adam alone are ~100 GiB
    # the tree reaches QLoRA (nf4 base, bf16-mixed) before bf16 weights; both strategies fit 24 GB
    assert p.recommended is not None and p.recommended.setup.lora and p.recommended.setup.quantize == "nf4"
    assert any(r.fits and r.setup.precision == "bf16-true" and r.setup.lora for r in p.strategies)
    assert arch.model_type == "llama" and arch.norm == "rmsnorm" and arch.mlp == "swiglu"
    assert not arch.tie_embeddings


def test_step_cost_counts_the_family_flops_and_the_recompute():
    """The planner ranks strategies by the model's own FLOPs (SwiGLU, untied head), not GPT-2's 12·C²·L."""
    mc = ModelConfig.from_hf(LLAMA_7B)
    arch, T, C, L, ffn = with_dropout(mc), 2048, 4096, 32, 11008
    base = setup_for(RunConfig(precision="fp32", max_seq_len=T), arch, 1)
    row = StrategyFit("fp32", replace(base, micro_bs=4), 4, 1, 0, 0)
    per_token = 6 * (L * (4 * C * C + 3 * C * ffn) + 32000 * C) + 12 * L * C * T  # matmuls + attention
    assert step_cost(arch, row) == pytest.approx(per_token / 0.5 * (1 + 512 / (4 * T)))
    ckpt = StrategyFit("ckpt", replace(base, micro_bs=4, precision="bf16-mixed", grad_ckpt=True), 4, 1, 0, 0)
    forward_again = L * (2 * (4 * C * C + 3 * C * ffn) + 4 * C * T)  # the checkpointed blocks' second forward
    assert step_cost(arch, ckpt) == pytest.approx((per_token + forward_again) * (1 + 512 / (4 * T)))


def test_llama_8b_preset_estimate_is_fast():
    """llama-3.1-8b's analytical estimate (and its plan) answer in well under a few seconds (see README)."""
    t0 = time.perf_counter()
    arch = load_shape("llama-3.1-8b")
    e = estimate(arch, setup_for(RunConfig(precision="bf16-mixed", max_seq_len=2048), arch, 1))
    assert time.perf_counter() - t0 < 10.0
    mc = ModelConfig.from_preset("llama-3.1-8b")
    assert e.details["parameters"] == mc.num_params()  # one formula: the replay's parameters are the model's


def test_a_bare_config_json_and_a_directory_give_the_same_arch(tmp_path):
    cfg = ModelConfig.from_preset("qwen3-tiny").to_hf()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_dir, by_file = load_shape(str(tmp_path)), load_shape(str(tmp_path / "config.json"))
    assert by_dir == by_file and by_dir.qk_norm and by_dir.model_type == "qwen3"
    assert by_dir.n_kv_head == 2 and by_dir.head_dim == 32


def test_gqa_config_is_smaller(tmp_path):
    mistral = {**LLAMA_7B, "model_type": "mistral", "num_key_value_heads": 8, "intermediate_size": 14336}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    arch = load_shape(str(tmp_path / "config.json"))
    assert arch.kv_dim == 1024 and arch.qkv_dim == 4096 + 2048


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="not supported"):
        load_shape(str(tmp_path))


# --- the command line -----------------------------------------------------------------------------
runner = CliRunner()
GPT2_RUN = ["estimate-mem", "--model", "gpt2", "--micro-bs", "8", "--seq-len", "1024", "--precision", "fp32"]


def _json(args: list[str]) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code in (0, 3, 4), res.output
    return json.loads(res.output)


def test_cli_gpt2_analytical_vs_trace():
    t0 = time.perf_counter()
    a = _json(GPT2_RUN)
    assert time.perf_counter() - t0 < 2.0
    t = _json([*GPT2_RUN, "--trace"])
    assert abs(a["peak_bytes"] - t["peak_bytes"]) <= TOLERANCE * t["peak_bytes"]
    assert a["engine"] == "analytical" and t["engine"] == "trace"
    assert sum(a["components"].values()) == a["peak_bytes"]
    assert a["peak_phase"] and a["total_bytes"] == a["peak_bytes"] + a["overhead_bytes"]


def test_cli_table_and_verdict():
    res = runner.invoke(app, [*GPT2_RUN, "--gpu-mem", "rtx3090", "--global-bs", "32"])
    assert res.exit_code == 0, res.output
    assert "activations" in res.output and "peak phase" in res.output and "recommended" in res.output
    res = runner.invoke(app, [*GPT2_RUN, "--gpu-mem", "4GiB"])
    assert res.exit_code == 4 and "does NOT fit" in res.output  # as asked; the recommended plan does


def test_cli_plan_json_and_micro_bs_auto():
    d = _json(["estimate-mem", "--model", "gpt2-mini", "--micro-bs", "auto", "--global-bs", "64",
               "--gpu-mem", "2GiB", "--precision", "bf16-mixed", "--seq-len", "512"])
    assert d["fits"] is True and d["plan"]["recommended"]["micro_bs"] == d["run"]["micro_bs"]
    assert {r["strategy"] for r in d["plan"]["strategies"]} >= {"fp32", "bf16-mixed"}


@pytest.mark.parametrize("args", [
    ["estimate-mem", "--model", "no-such-model"],
    ["estimate-mem"],
    [*GPT2_RUN, "--gpu-mem", "lots"],
    ["estimate-mem", "--model", "gpt2", "--seq-len", "4096"],
    ["estimate-mem", "--model", "gpt2", "--precision", "fp8"],
    ["estimate-mem", "--model", "gpt2", "--micro-bs", "auto"],
])
def test_cli_bad_input_exits_2(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output


def test_cli_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "gpt2-tiny"\nmicro_bs = 2\nmax_seq_len = 64\nprecision = "bf16-mixed"\n'
                      'lora = true\n')
    d = _json(["estimate-mem", "--recipe", str(recipe)])
    assert d["run"]["lora"] and d["run"]["micro_bs"] == 2 and d["run"]["seq_len"] == 64


def test_constants_mirror_the_torch_modules():
    """The analytical modules avoid importing torch; their copies of model/optim/lora facts must agree."""
    from microft import optimizers
    from microft.memory import estimate as memory
    from microft.memory import replay
    from microft.models import lora
    from microft.models.families import GPT2_LORA
    from microft.models.transformer import Transformer
    from microft.train import master_adamw, optim

    # one no-decay rule and one chunk constant, read by both (microft.optimizers, microft.layouts)
    assert replay.decays is optim.decays and optimizers.MASTER_CHUNK is master_adamw.MASTER_CHUNK
    # the estimator adapts exactly the linears LoRA wraps
    for spec, names in [("qkv,proj", {"attn.c_attn", "attn.c_proj"}),
                        ("attn", {"attn.c_attn", "attn.c_proj"}),
                        ("mlp", {"mlp.c_fc", "mlp.c_proj"}), ("fc,qkv", {"attn.c_attn", "mlp.c_fc"}),
                        ("all", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})]:
        model = Transformer(ModelConfig(name="t", vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                                        n_head=2))
        lora.apply_lora(model, 2, 4.0, 0.0, spec)
        wrapped = {n.removeprefix("h.0.").rsplit(".lora_", 1)[0] for n, _ in model.named_parameters()
                   if n.startswith("h.0.") and ".lora_" in n}
        assert wrapped == names, spec
        assert {".".join(GPT2_LORA[t]) for t in memory.lora_targets(spec)} == names, spec


# --- what the user asked: the batch they gave, the data they have --------------------------------
def test_cli_micro_bs_without_global_bs_is_the_batch_to_keep():
    """`--micro-bs 8` asks "does batch 8 fit?": the plan keeps 8 samples a step, never another batch size."""
    for extra in ([], ["--seq-len", "128"], ["--accum", "2"]):
        d = _json(["estimate-mem", "--model", "gpt2-medium", "--micro-bs", "8", "--gpu-mem", "18GB", *extra])
        want = 8 * (2 if extra[:1] == ["--accum"] else 1)
        assert d["plan"]["global_bs"] == want
        rows = [r for r in d["plan"]["strategies"] + d["plan"]["decision_tree"] if r["fits"]]
        assert rows and all(r["micro_bs"] * r["accum"] == want for r in rows)
        rec = d["plan"]["recommended"]
        assert rec["micro_bs"] * rec["accum"] == want


def _alpaca(path, outputs: list[str]) -> str:
    path.write_text("\n".join(json.dumps({"instruction": f"Repeat item {i}.", "input": "", "output": o})
                              for i, o in enumerate(outputs)))
    return str(path)


def test_cli_data_measures_the_real_lengths(tmp_path):
    """--data: the estimate uses the longest training sample finetune would build, and says so."""
    from microft.config import resolve_config
    from microft.runs import finetune_lengths

    data = _alpaca(tmp_path / "d.jsonl", [" ".join(["word"] * (5 + i % 40)) for i in range(60)])
    base = ["estimate-mem", "--model", "gpt2", "--micro-bs", "4", "--precision", "fp32"]
    d = _json([*base, "--data", data])
    longest = max(finetune_lengths(resolve_config(None, data=data, model="gpt2"), 1024))
    assert 20 < longest < 100 and d["run"]["seq_len"] == longest
    assert f"seq {longest}" in d["estimated"] and any("from --data" in n for n in d["notes"])
    same = _json([*base, "--seq-len", str(longest)])  # the same step as asking for that length
    assert same["peak_bytes"] == d["peak_bytes"] < _json(base)["peak_bytes"]
    # a longer record raises it; --max-seq-len still cuts it
    longer = _alpaca(tmp_path / "e.jsonl",
                     [" ".join(["word"] * (5 + i % 40)) for i in range(59)] + ["word " * 300])
    assert _json([*base, "--data", longer])["run"]["seq_len"] > longest + 200
    assert _json([*base, "--data", longer, "--max-seq-len", "128"])["run"]["seq_len"] == 128
    res = runner.invoke(app, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2, res.output


def test_cli_piped_output_says_what_was_estimated():
    res = runner.invoke(app, GPT2_RUN)  # CliRunner's stdout is not a terminal: the plain format
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("estimated: gpt2: micro-bs 8 × seq 1024, accum 1, fp32"), first


def test_auto_micro_batch_never_outgrows_the_data_and_huge_batches_answer_fast():
    """Without --global-bs, `--micro-bs auto` stops at the training set (a huge budget once chose 4096 for 54
    samples, then refused the run); the planner lists a huge global batch's divisors in sqrt steps, and the
    estimator replays a huge micro-batch's loss chunks without listing them all (both took minutes, or all the
    memory, for the sizes below)."""
    from microft.memory.plan import divisors
    from microft.models.config import ce_chunk_rows, ce_chunks

    mc = ModelConfig.from_preset("gpt2-tiny")
    cfg = RunConfig(precision="fp32", max_seq_len=32, micro_bs="auto")
    big = Budget(2**50, "a petabyte")
    assert auto_batch_plan(cfg, with_dropout(mc), big, n_train=54).micro_bs == 54
    accum4 = cfg.model_copy(update={"accum": 4})
    assert auto_batch_plan(accum4, with_dropout(mc), big, n_train=54).micro_bs == 13
    assert auto_batch_plan(cfg, with_dropout(mc), big).micro_bs == 4096  # no data known: the planner's cap
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36] and divisors(1) == [1] and divisors(97) == [1, 97]
    for n in (0, 1, 300, 1024, 5000, 123457):
        chunks = ce_chunks(n, 50304)
        assert all(rows == ce_chunk_rows(n, 50304) for _, rows in chunks[:-1])
        assert not chunks or chunks[-1][1] <= ce_chunk_rows(n, 50304)
    arch = with_dropout(ModelConfig.from_preset("gpt2"))
    e = estimate(arch, setup_for(RunConfig(precision="bf16-mixed"), arch, 10**8), None)
    p = fit_budget(arch, setup_for(RunConfig(precision="bf16-mixed"), arch, 1), Budget(24 * 2**30, "24 GiB"),
                   10**9)
    assert e.peak_bytes > 10**15 and p.recommended is not None


def test_estimate_with_data_sizes_packed_rows_at_the_context_and_an_empty_budget_is_refused(tmp_path):
    """With --data the estimate uses the longest sample, but packed rows fill up to --max-seq-len (it used to
    size them at the longest sample: an underestimate); --gpu-mem "" (an unset $VAR) is an error, not no
    budget."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Say it.", "output": "ok"}) + "\n" for _ in range(8)))
    flags = ["estimate-mem", "--model", "gpt2", "--data", str(data), "--max-seq-len", "256", "--json"]
    plain = json.loads(CliRunner().invoke(app, flags).output)
    packed = json.loads(CliRunner().invoke(app, [*flags, "--packing"]).output)
    assert "256" in packed["estimated"] and packed["peak_bytes"] > plain["peak_bytes"]
    res = CliRunner().invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--gpu-mem", ""])
    assert res.exit_code == 2 and "--gpu-mem ''" in res.output


def test_the_analytical_path_imports_no_torch():
    """`import microft.memory.estimate` and a whole `estimate-mem` plan (no --trace) never load torch."""
    import subprocess
    import sys

    code = ("import sys\nimport microft.memory.estimate\nassert 'torch' not in sys.modules, 'import'\n"
            "from microft.cli import main\n"
            "sys.argv = ['microft', 'estimate-mem', '--model', 'llama-3.1-8b', '--global-bs', '8',"
            " '--seq-len', '1024', '--gpu-mem', '18GB', '--json']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "assert 'torch' not in sys.modules, 'estimate-mem'\nprint('exit', code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("exit 4")  # 8B full fine-tuning fits 18 GB only as recommended


def test_repeated_chunks_are_replayed_once():
    """The 8-bit AdamW replay walks two full chunks of a tensor and its short last one: the same peak as
    walking all of them (each further full chunk frees what it allocates over the same live set)."""
    from microft import optimizers  # the 8-bit AdamW entry's replay

    arch = load_shape("qwen3-0.6b")
    s = setup_for(RunConfig(precision="bf16-true", optimizer="adamw-8bit", max_seq_len=64), arch, 1, accum=2)
    fast = estimate(arch, s)
    every = optimizers.chunk_sizes
    try:
        optimizers.chunk_sizes = lambda n, chunk: [min(chunk, n - i) for i in range(0, n, chunk)]
        slow = estimate(arch, s)
    finally:
        optimizers.chunk_sizes = every
    assert fast.peak_bytes == slow.peak_bytes and fast.step_peaks == slow.step_peaks
    assert optimizers.chunk_sizes(5 * 2**20 + 7, 2**20) == [2**20, 2**20, 7]


# --- what the answers mean: the run's own LoRA rank, what a plan keeps and changes, the exit codes --------
RECIPE = str(Path(__file__).parent.parent / "recipes" / "gpt2-medium-lora.toml")  # LoRA r=16, 1 × 8, ckpt
MEDIUM_LORA = ["estimate-mem", "--recipe", RECIPE, "--model", "gpt2-medium"]


@pytest.mark.parametrize("flags, rank", [([], 8), (["--lora-r", "4"], 4), (["--lora", "--lora-r", "32"], 32)])
def test_the_plan_uses_the_runs_own_lora_rank(flags, rank):
    """The plan's LoRA rows and tree step train the rank the run would (--lora-r, default 8), not 16."""
    d = _json(["estimate-mem", "--model", "gpt2-medium", "--micro-bs", "4", "--seq-len", "256",
               "--gpu-mem", "3GiB", *flags])
    lora_rows = [r for r in d["plan"]["strategies"] + d["plan"]["decision_tree"] if r["lora"]]
    assert lora_rows and all(r["lora_r"] == rank for r in lora_rows)
    names = [r["strategy"] for r in d["plan"]["strategies"] if r["lora"]]
    assert all(f"r={rank}" in n for n in names) and not any("r=16" in n for n in names if rank != 16)
    arch = load_shape("gpt2-medium")
    base = setup_for(RunConfig(max_seq_len=256, lora_r=rank), arch, 1)
    row = next(r for r in fit_budget(arch, base, parse_budget("3GiB"), 4).strategies if r.setup.lora)
    smaller = fit_budget(arch, replace(base, lora_r=1), parse_budget("3GiB"), 4)
    assert row.setup.lora_r == rank and next(r for r in smaller.strategies if r.setup.lora).setup.lora_r == 1


def test_the_recommendation_says_what_it_keeps_and_what_it_changes():
    """The recipe's 1 × 8 fits 8 GiB; the plan's faster 8 × 1 keeps the recipe's precision, checkpointing and
    LoRA r=16, and says that only the batch split changes (it used to call that "your settings")."""
    d = _json([*MEDIUM_LORA, "--gpu-mem", "8GiB"])
    rec = d["plan"]["recommended"]
    assert d["plan"]["asked"] == [1, 8] and (rec["micro_bs"], rec["accum"]) == (8, 1)
    assert rec["changes"] == ["--micro-bs 8 --accum 1"]
    assert {"LoRA r=16", "grad ckpt", "bf16-mixed", "adamw"} <= set(rec["keeps"])
    full = next(r for r in d["plan"]["strategies"] if r["strategy"] == "fp32")
    assert {"--precision fp32", "no --grad-ckpt", "no --lora"} <= set(full["changes"])
    res = runner.invoke(app, [*MEDIUM_LORA, "--gpu-mem", "8GiB"])
    text = " ".join(res.output.split())
    assert ("recommended: your settings: change --micro-bs 8 --accum 1 (you asked --micro-bs 1 --accum 8); "
            "keeps your bf16-mixed, adamw, grad ckpt, LoRA r=16") in text
    assert "changes" in res.output.splitlines()[next(i for i, x in enumerate(res.output.splitlines())
                                                     if x.startswith("strategy"))]
    # asked exactly as the plan would run it: nothing to change
    d = _json([*MEDIUM_LORA, "--micro-bs", "8", "--accum", "1", "--gpu-mem", "8GiB"])
    rec = d["plan"]["recommended"]
    assert rec["changes"] == [] and "micro-bs 8 × accum 1" in rec["keeps"]


def test_every_plan_column_is_explained_once():
    res = runner.invoke(app, [*MEDIUM_LORA, "--gpu-mem", "8GiB"])
    assert res.exit_code == 0, res.output
    legend = [line for line in res.output.splitlines() if line.startswith("columns: ")]
    assert len(legend) == 1
    for column in ("micro-bs, accum:", "total:", "step cost:", "changes:"):
        assert legend[0].count(column) == 1, column
    assert "time per token relative to the cheapest plan that fits (1.00×)" in legend[0]


@pytest.mark.parametrize("args, code, meaning", [
    ([*MEDIUM_LORA, "--gpu-mem", "8GiB"], 0, "fits as asked"),
    ([*MEDIUM_LORA, "--gpu-mem", "2GiB"], 4, "fits with the recommended change"),
    (["estimate-mem", "--model", "gpt2-medium", "--micro-bs", "8", "--gpu-mem", "1GB"], 3, "nothing fits"),
    (["estimate-mem", "--model", "gpt2-medium", "--micro-bs", "auto", "--gpu-mem", "1GB"], 3, "nothing fits"),
    (["estimate-mem", "--model", "gpt2-medium", "--micro-bs", "8"], 0, None),  # no budget: nothing to judge
])
def test_exit_codes_and_json_carry_the_same_verdict(args, code, meaning):
    """0 fits as asked, 4 only the recommended change fits, 3 nothing fits (README: the exit code table); the
    plain output's last line and --json say the same."""
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    if meaning:
        assert res.output.splitlines()[-1] == f"answer: {meaning} (exit code {code})"
    d = _json(args)
    assert d["exit_code"] == code and d["verdict"] == meaning
    assert d["fits"] is (None if meaning is None else code == 0)
    if code == 4:
        assert d["plan"]["recommended"]["total_bytes"] <= d["plan"]["budget_bytes"] < d["total_bytes"]
    if code == 3:
        assert d["plan"]["recommended"] is None


def test_the_documented_exit_codes_do_not_collide():
    from microft.memory.plan import FITS, FITS_WITH_CHANGE, NOTHING_FITS, VERDICTS

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    tables = [t.split("\n\n", 1)[0] for t in readme.split("| exit code | meaning |")[1:]]
    assert len(tables) == 2  # every command's, and estimate-mem's own
    assert len({FITS, FITS_WITH_CHANGE, NOTHING_FITS}) == 3 == len(VERDICTS)
    for i, text in enumerate(tables):
        rows = re.findall(r"^\| (\d+(?: / \d+)?) \| (.+) \|$", text, re.M)
        codes = [c for key, _ in rows for c in key.split(" / ")]
        assert len(codes) == len(set(codes)), codes
        if i == 0:
            assert {"0", "1", "2", "3", "4", "130", "143"} <= set(codes)
        table = dict(rows)
        for code in (FITS, FITS_WITH_CHANGE, NOTHING_FITS):
            assert VERDICTS[code] in table[str(code)], (i, code)  # each answer documented in its own row
