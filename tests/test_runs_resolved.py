"""One resolution of a run: the precision policies, the rules of `microft.resolved`, and the proof that
`finetune` and `estimate-mem` given the same flags resolve the same run (device, precision, sequence length,
batch plan, sources)."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from microft.cli import app
from microft.config import RunConfig
from microft.errors import ConfigError
from microft.memory.estimate import budget_device, parse_budget
from microft.models.config import ModelConfig
from microft.resolved import (
    POLICIES,
    Device,
    auto_precision,
    plan_batch,
    precision_policy,
    resolve_run,
    resolve_seq_len,
)

runner = CliRunner()


def test_the_policies_say_what_each_precision_does():
    names = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
    fp32, bf16_mixed, fp16_mixed, bf16_true = (POLICIES[n] for n in names)
    assert not fp32.autocast and not fp32.low_precision and fp32.param_bytes == 4
    assert bf16_mixed.autocast and bf16_mixed.compute_dtype == "bfloat16" and bf16_mixed.param_bytes == 4
    assert fp16_mixed.grad_scaler and fp16_mixed.autocast and not fp16_mixed.master_weights
    assert bf16_true.master_weights and not bf16_true.autocast and bf16_true.param_bytes == 2
    assert [p for p in POLICIES.values() if p.grad_scaler] == [fp16_mixed]
    assert str(bf16_true) == "bf16-true" and precision_policy("fp32") is fp32
    with pytest.raises(ConfigError, match="choose fp32"):
        precision_policy("auto")


@pytest.mark.parametrize(("device", "expected"), [
    (Device("cuda", bf16=True), "bf16-mixed"), (Device("cuda", bf16=False), "fp16-mixed"),
    (Device("cpu", bf16=True), "bf16-mixed"), (Device("cpu", bf16=False), "fp32"),
    (Device("mps", bf16=False), "fp32"), (Device("xpu", bf16=True), "fp32"),
])
def test_auto_precision_per_device(device, expected):
    assert auto_precision(device).name == expected


def test_the_trainer_and_the_estimator_resolve_auto_alike():
    """The step's resolver (a torch device) and the estimator's (a budget) both ask `auto_precision`."""
    import torch

    from microft.memory.estimate import resolve_precision as for_budget
    from microft.models.precision import cpu_supports_bf16
    from microft.train.step import precision_for

    cpu = Device("cpu", bf16=cpu_supports_bf16())
    assert precision_for("auto", torch.device("cpu")) is auto_precision(cpu)
    assert for_budget("auto", parse_budget("t4")) == "fp16-mixed"
    assert for_budget("auto", parse_budget("rtx3090")) == for_budget("auto") == "bf16-mixed"
    assert for_budget("bf16-true", parse_budget("t4")) == "bf16-true"


def test_sequence_length_and_its_one_message():
    assert resolve_seq_len(None, 1024) == 1024 and resolve_seq_len(512, 1024) == 512
    with pytest.raises(ConfigError, match="^--seq-len 2048 exceeds the model's context of 1024$"):
        resolve_seq_len(2048, 1024, "--seq-len")
    shape = ModelConfig.from_preset("gpt2-tiny")
    with pytest.raises(ConfigError, match="--max-seq-len 9999 exceeds"):
        resolve_run(RunConfig(max_seq_len=9999), shape, Device("cpu"))


def test_an_nf4_base_under_fp16_is_refused_on_the_device_auto_finds():
    # --device auto: the validator can't tell the device; the resolver refuses it on the one auto finds
    cfg = RunConfig(lora=True, quantize="nf4", precision="fp16-mixed")
    shape = ModelConfig.from_preset("gpt2-tiny")
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_run(cfg, shape, Device("cpu"))
    assert resolve_run(cfg, shape, Device("cuda")).precision.grad_scaler


def test_the_default_batch_without_a_planner_or_memory_is_micro_batch_one():
    shape = ModelConfig.from_preset("gpt2-tiny")
    run = resolve_run(RunConfig(), shape, Device("cuda"))
    never = lambda *a: pytest.fail("planned without knowing the memory")  # noqa: E731
    planned = plan_batch(run, RunConfig(), shape, n_train=100, planner=never)
    assert (planned.plan.micro_bs, planned.plan.accum, planned.default_batch) == (1, 16, True)
    assert "no device memory is given" in planned.notes[0]
    cut = plan_batch(run, RunConfig(), shape, n_train=7, planner=None, world_size=2)
    assert cut.plan.global_bs == 6 and cut.world_size == 2 and "cut to the 7 training samples" in cut.notes[0]



def test_a_cpu_whose_free_memory_is_unknown_trains_the_default_batch_at_micro_batch_one(monkeypatch):
    """macOS has no SC_AVPHYS_PAGES (and Windows no sysconf): the run's device then has no memory, not a
    traceback."""
    import os

    from microft.runs import local_device

    real = os.sysconf

    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real(name)

    monkeypatch.setattr(os, "sysconf", sysconf)
    device = local_device(RunConfig(device="cpu"))
    assert device.kind == "cpu" and device.memory_bytes is None
    shape = ModelConfig.from_preset("gpt2-tiny")
    planned = plan_batch(resolve_run(RunConfig(device="cpu"), shape, device), RunConfig(device="cpu"), shape,
                         n_train=100, planner=lambda *a: pytest.fail("planned without knowing the memory"))
    assert (planned.plan.micro_bs, planned.plan.accum) == (1, 16)

# --- finetune and estimate-mem resolve the same run ------------------------------------------------------
def alpaca(path, n: int = 60):
    rnd = random.Random(0)
    words = ["a", "bb", "ccc"]
    recs = [{"instruction": "say " + " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 20))),
             "input": "", "output": "ok " * rnd.randint(1, 12)} for _ in range(n)]
    path.write_text(json.dumps(recs))
    return path


def finetune_resolved(monkeypatch, tmp_path, gpu: str, flags: list[str]) -> dict:
    """The resolved run `finetune` trains with, on a stand-in device of the `gpu` budget's memory; the loop
    itself is replaced by a recorder (the run is resolved before it starts)."""
    import microft.runs
    import microft.train.loop

    seen = {}

    def record(model, train_set, val_set, cfg, plan, *a, resolved=None, **k):
        seen.update(resolved=resolved, plan=plan)
        return {"final_dir": str(tmp_path)}

    monkeypatch.setattr(microft.runs, "local_device", lambda cfg: budget_device(parse_budget(gpu)))
    monkeypatch.setattr(microft.train.loop, "train", record)
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    res = runner.invoke(app, ["finetune", *flags, "--out", str(out), "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    assert seen["plan"] == seen["resolved"].plan  # the loop is handed the resolved plan
    return seen["resolved"].to_dict()


def estimate_resolved(gpu: str, flags: list[str]) -> dict:
    res = runner.invoke(app, ["estimate-mem", *flags, "--gpu-mem", gpu, "--json"])
    assert res.exit_code in (0, 3, 4), res.output
    d = json.loads(res.output)
    plan = d["resolved"]["plan"]
    seq = d["resolved"]["plan_seq_len"]
    assert f"micro-bs {plan['micro_bs']} × seq {seq}, accum {plan['accum']}" in d["estimated"]
    return d["resolved"]


@pytest.mark.parametrize(("gpu", "flags"), [
    ("700MiB", []),  # no batch flags: the default global batch, micro-batch the largest that fits
    ("1GiB", []),
    ("700MiB", ["--micro-bs", "2", "--accum", "3"]),
    ("700MiB", ["--global-bs", "8"]),
    ("1GiB", ["--micro-bs", "auto", "--global-bs", "8"]),
    ("1GiB", ["--micro-bs", "auto", "--accum", "2"]),
    ("1GiB", ["--max-seq-len", "64"]),
    ("t4", ["--global-bs", "4"]),  # auto precision on a GPU without bf16: fp16-mixed
    ("1GiB", ["--precision", "bf16-true", "--lora", "--lora-r", "4"]),
    ("1GiB", ["--packing", "--max-seq-len", "128"]),
])
def test_finetune_and_estimate_mem_resolve_the_same_run(monkeypatch, tmp_path, gpu, flags):
    common = ["--model", "gpt2-tiny", "--data", str(alpaca(tmp_path / "d.json")), *flags]
    mine = finetune_resolved(monkeypatch, tmp_path, gpu, common)
    theirs = estimate_resolved(gpu, common)
    assert mine == theirs
    if gpu == "t4":
        assert mine["precision"] == "fp16-mixed"


def test_the_budget_plan_caps_a_micro_batch_at_the_data_as_auto_does(tmp_path):
    """With --data and no global batch, the --gpu-mem plan's micro-batches are a step's share of the
    training samples at most, as --micro-bs auto's: it never recommends more rows than the data has."""
    data = alpaca(tmp_path / "d.json", 12)
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--data", str(data), "--micro-bs",
                              "auto", "--gpu-mem", "1GiB", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    n_train = d["resolved"]["plan"]["micro_bs"]  # auto's cap: the training samples of a step
    assert n_train < 12  # a held-out share is not trained on
    rows = [d["plan"]["recommended"], *d["plan"]["strategies"], *d["plan"]["decision_tree"]]
    assert all(r["micro_bs"] <= n_train for r in rows if r["fits"])
    assert d["plan"]["recommended"]["micro_bs"] == n_train


def test_a_recipe_and_estimate_mems_seq_len_resolve_alike(monkeypatch, tmp_path):
    data = alpaca(tmp_path / "d.json")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "gpt2-tiny"\ndata = "{data}"\nmicro_bs = 2\naccum = 4\nlr = 1e-3\n'
                      'grad_ckpt = true\nmax_seq_len = 70\n')
    mine = finetune_resolved(monkeypatch, tmp_path, "1GiB", ["--recipe", str(recipe)])
    assert estimate_resolved("1GiB", ["--recipe", str(recipe)]) == mine
    assert (mine["plan"]["micro_bs"], mine["plan"]["accum"], mine["seq_len"]) == (2, 4, 70)
    flags = ["--model", "gpt2-tiny", "--data", str(data)]
    typed = estimate_resolved("1GiB", [*flags, "--seq-len", "72"])
    assert typed == finetune_resolved(monkeypatch, tmp_path, "1GiB", [*flags, "--max-seq-len", "72"])


def test_estimate_mem_without_batch_flags_plans_finetunes_default_batch():
    """estimate-mem given no batch flag estimates the batch a run would train with: the default global batch
    of 16 (micro-batch 1 without a budget, saying so), not micro-batch 1 × accum 1."""
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--json"])
    d = json.loads(res.output)
    assert res.exit_code == 0 and "micro-bs 1 × seq 256, accum 16" in d["estimated"]
    assert any("global batch 16 (the default), at micro-batch 1" in n for n in d["notes"])
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--gpu-mem", "24GiB", "--json"])
    d = json.loads(res.output)
    assert d["resolved"]["plan"] == {"micro_bs": 16, "accum": 1, "world_size": 1}
    assert d["plan"]["global_bs"] == 16 and any("no batch flags" in n for n in d["notes"])
    with_flags = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--micro-bs", "1", "--json"])
    assert "accum 1," in json.loads(with_flags.output)["estimated"]



def test_the_default_batch_cut_to_the_data_is_one_note(tmp_path):
    data = alpaca(tmp_path / "d.json", 9)
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--data", str(data),
                              "--gpu-mem", "24GB", "--json"])
    notes = [n for n in json.loads(res.output)["notes"] if n.startswith("no batch flags")]
    assert len(notes) == 1 and "split as --micro-bs auto" in notes[0] and "cut to the 8" in notes[0], notes


@pytest.mark.parametrize(("flags", "kept"), [
    ([], 16), (["--global-bs", "8"], 8), (["--micro-bs", "2"], 2), (["--accum", "4"], None),
    (["--micro-bs", "auto", "--accum", "2"], None),
])
def test_the_budget_plan_keeps_the_global_batch_asked_for(flags, kept):
    """The plan's strategies keep the run's global batch: the default, --global-bs, or a micro-batch with its
    accumulation; --accum alone or --micro-bs auto without --global-bs keep only the accumulation."""
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--gpu-mem", "8GiB", "--json", *flags])
    assert json.loads(res.output)["plan"]["global_bs"] == kept


def test_a_run_looks_its_hub_model_up_once_for_its_files(monkeypatch, tmp_path):
    """`finetune --model ORG/NAME` finds the repo's cached snapshot for the model's shape, for its weights and
    once for its files (the tokenizer, the LoRA note, every save's tokenizer files): three lookups, however
    often the run saves (a lookup per save before)."""
    pytest.importorskip("transformers")
    import microft.models.source as source
    from tests.test_families_e2e import COMMIT, hf_dir

    repo = tmp_path / "hub" / "models--tiny--llama"
    hf_dir(repo / "snapshots" / COMMIT, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lookups, real = [], source.resolve_model_dir

    def counted(spec, *a, **k):
        if source.is_repo_id(spec):
            lookups.append(spec)
        return real(spec, *a, **k)

    monkeypatch.setattr(source, "resolve_model_dir", counted)
    out, data = tmp_path / "out", alpaca(tmp_path / "d.json", 20)
    res = runner.invoke(app, ["finetune", "--model", "tiny/llama", "--data", str(data), "--lora",
                              "--max-steps", "3", "--save-every", "1", "--keep-last", "5",
                              "--eval-every", "100", "--micro-bs", "1", "--accum", "1", "--device", "cpu",
                              "--precision", "fp32", "--max-seq-len", "64", "--out", str(out),
                              "--log-format", "plain"])
    assert res.exit_code == 0, res.output
    saved = [out / "final", *sorted((out / "checkpoints").iterdir())]
    assert len(saved) >= 3 and all((d / "tokenizer.json").is_file() for d in saved)
    assert "randomly initialised" not in res.output  # the LoRA note knows the base was read from files
    assert lookups == ["tiny/llama"] * 3
