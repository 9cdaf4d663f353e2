"""Preference tuning (`microft dpo`): step for step equal to TRL's DPOTrainer (full and LoRA), the loss a mean
over the pairs of the global batch whatever its split, bit-exact resume, the losses' formulas, bad pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from microft.cli import app  # noqa: E402
from microft.config import RunConfig  # noqa: E402
from microft.data.preference import final_response_only, parse_pair, read_pairs  # noqa: E402
from microft.errors import DataError, Interrupted  # noqa: E402
from microft.models.artifacts import load_any  # noqa: E402
from microft.models.config import IGNORE_INDEX  # noqa: E402
from microft.runs import run_dpo  # noqa: E402
from microft.train.preference import PreferenceLoss, pair_losses  # noqa: E402
from microft.weights import read_safetensors  # noqa: E402
from tests.helpers import sigint_at_step  # noqa: E402
from tests.test_families_e2e import hf_dir  # noqa: E402

runner = CliRunner()
WORDS = "red green blue cat dog sun moon tree".split()
VERBATIM = {"name": "verbatim", "prompt": "{instruction}{input}", "prompt_no_input": "{instruction}"}


def pairs_file(path: Path, n: int = 16) -> Path:
    """{prompt, chosen, rejected} records whose prompt ends on a token boundary (a newline), so that TRL's
    tokenisation of prompt + response as one text and microft's piece by piece give the same ids."""
    lines = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(3 * i + 1) % 8]
        rejected = f"{b} {a}" + (f" {a}" if i % 2 else "")  # unequal lengths: the mean is over pairs
        lines.append(json.dumps({"prompt": f"Say {a} and {b}.\n", "chosen": f"{a} {b}",
                                 "rejected": rejected}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model = hf_dir(root / "qwen", "qwen3")
    template = root / "verbatim.json"
    template.write_text(json.dumps(VERBATIM))
    return {"root": root, "model": model, "data": pairs_file(root / "pairs.jsonl"), "template": template}


def dpo_cfg(setup, out: Path, micro_bs: int = 2, accum: int = 2, **kw) -> RunConfig:
    base = dict(model=str(setup["model"]), data=str(setup["data"]), out=str(out), micro_bs=micro_bs,
                accum=accum, max_steps=4, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                schedule="constant", warmup=0, max_grad_norm=0, precision="fp32", device="cpu",
                template=str(setup["template"]), shuffle=False, val_frac=0.0, eval_every=0,
                log_format="plain", seed=3)
    base.update(kw)
    if base["optimizer"] != "sgd":
        del base["momentum"]
    return RunConfig(**base)


def step_losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["kind"] == "step"]


def trl_run(setup, out: Path, loss_type: str, micro_bs: int, accum: int, steps: int,
            adapter: Path | None = None):
    """TRL's DPOTrainer on the same model, data (in file order), batch, SGD and constant lr, training the PEFT
    `adapter` (microft's initial one) when given; returns (per-step losses, per-step rewards/margins, the
    trained model)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in setup["data"].read_text().splitlines()]
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=micro_bs,
                         gradient_accumulation_steps=accum, max_steps=steps, learning_rate=0.05,
                         lr_scheduler_type="constant", warmup_steps=0, optim="sgd", weight_decay=0.0,
                         max_grad_norm=0.0, beta=0.1, loss_type=[loss_type], bf16=False,
                         gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                         use_cpu=True, seed=3, train_sampling_strategy="sequential",
                         max_length=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(setup["model"])
    if adapter is not None:
        peft = pytest.importorskip("peft")
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h["rewards/margins"] for h in logs], trainer.model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_full_fine_tuning_equals_trl_step_for_step(setup, tmp_path, loss_type):
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "mft", loss="dpo" if loss_type == "sigmoid" else "ipo"), events.append)
    losses, margins, trl_model = trl_run(setup, tmp_path / "trl", loss_type, 2, 2, 4)
    assert step_losses(events) == pytest.approx(losses, rel=1e-4, abs=1e-5)
    ours = [e["rewards/margins"] for e in events if e["kind"] == "step"]
    assert ours == pytest.approx(margins, rel=1e-3, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(losses, losses[1:])) > 1e-3  # the steps did change something
    assert_same_model(load_any(str(tmp_path / "mft" / "final")), trl_model)


def assert_same_model(mine, theirs) -> None:
    """The final weights agree: the same logits on a probe sequence (microft's and transformers' layouts
    differ), and not the starting model's."""
    x = torch.tensor([[5, 17, 99, 3, 250, 41, 8, 300]])
    start = transformers.AutoModelForCausalLM.from_pretrained(theirs.config._name_or_path,
                                                              dtype=torch.float32)
    with torch.no_grad():
        want = theirs.eval()(x).logits
        assert torch.allclose(mine.eval()(x), want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(start.eval()(x).logits, want, atol=1e-3)


def test_lora_equals_trl_step_for_step_with_the_base_as_reference(setup, tmp_path):
    peft = pytest.importorskip("peft")
    events: list[dict] = []
    cfg = dpo_cfg(setup, tmp_path / "mft", lora=True, lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj")
    run_dpo(cfg, events.append)
    initial = initial_adapter(cfg, tmp_path / "init")
    losses, _, trl_model = trl_run(setup, tmp_path / "trl", "sigmoid", 2, 2, 4, adapter=initial)
    assert step_losses(events) == pytest.approx(losses, rel=1e-4, abs=1e-5)
    base = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    mine = peft.PeftModel.from_pretrained(base, tmp_path / "mft" / "final").eval()  # microft's PEFT adapter
    x = torch.tensor([[5, 17, 99, 3, 250, 41, 8]])
    with torch.no_grad():
        assert torch.allclose(mine(x).logits, trl_model.eval()(x).logits, atol=1e-4, rtol=1e-4)
        with mine.disable_adapter():
            assert not torch.allclose(mine(x).logits, trl_model(x).logits, atol=1e-4)


def initial_adapter(cfg: RunConfig, d: Path) -> Path:
    """The adapters `run_dpo` starts from (B = 0; A drawn from the run's seed), as a PEFT adapter
    directory."""
    from microft.models.lora import save_adapter
    from microft.runs import add_lora, load_base, model_files, resolve_here, seed_init

    seed_init(cfg.seed)
    run = resolve_here(cfg)[0]
    model = load_base(cfg, run)
    add_lora(cfg, model, lambda e: None, model_files(run) is not None)
    return save_adapter(d, model, cfg.model)


@pytest.mark.parametrize("loss", ["dpo", "simpo", "orpo"])
def test_any_split_of_the_global_batch_gives_the_same_weights(setup, tmp_path, loss):
    results = {}
    for mb, acc in [(1, 4), (4, 1), (2, 2)]:
        events: list[dict] = []
        run_dpo(dpo_cfg(setup, tmp_path / f"{mb}x{acc}", mb, acc, loss=loss, max_steps=3), events.append)
        accuracies = [e["rewards/accuracies"] for e in events if e["kind"] == "step"]
        results[(mb, acc)] = (read_safetensors(tmp_path / f"{mb}x{acc}" / "final" / "model.safetensors"),
                              step_losses(events), accuracies)
    ref_w, ref_loss, ref_acc = results[(4, 1)]
    for key, (w, losses, acc) in results.items():
        assert losses == pytest.approx(ref_loss, abs=1e-5), key
        assert acc == ref_acc, key
        for name in ref_w:
            assert torch.allclose(w[name], ref_w[name], atol=1e-5, rtol=0), (key, name)


def test_precomputed_reference_log_probs_train_as_the_live_reference(setup, tmp_path):
    live, cached = [], []
    run_dpo(dpo_cfg(setup, tmp_path / "live"), live.append)
    run_dpo(dpo_cfg(setup, tmp_path / "cached", precompute_ref=True), cached.append)
    assert step_losses(cached) == pytest.approx(step_losses(live), rel=1e-5, abs=1e-6)
    banner = next(e for e in cached if e["kind"] == "banner")
    assert "precomputed" in banner["preference"]


def test_resume_after_sigint_is_bit_exact(setup, tmp_path):
    ref: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "ref", max_steps=4, optimizer="adamw"), ref.append)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run_dpo(dpo_cfg(setup, out, max_steps=4, optimizer="adamw"), sigint_at_step(2))
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, out, max_steps=4, optimizer="adamw", resume="auto"), events.append)
    assert [e["step"] for e in events if e["kind"] == "step"] == [3, 4]
    assert step_losses(events) == step_losses(ref)[2:]
    want = read_safetensors(tmp_path / "ref" / "final" / "model.safetensors")
    got = read_safetensors(out / "final" / "model.safetensors")
    for name, t in want.items():
        assert torch.equal(t, got[name]), name


def test_evaluation_reports_rewards_and_the_margin_rises_on_held_out_pairs(setup, tmp_path):
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "run", max_steps=6, eval_every=3, val_frac=0.25, optimizer="adamw",
                    lr=3e-3), events.append)
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[0]["rewards/margins"] == 0.0 and evals[0]["val_loss"] == pytest.approx(math.log(2))
    assert evals[-1]["rewards/margins"] > 0.0 and evals[-1]["val_loss"] < math.log(2)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in recs), key


def test_the_losses_follow_their_formulas():
    torch.manual_seed(0)
    policy, ref = torch.randn(5, 2) - 3, torch.randn(5, 2) - 3
    n = torch.tensor([[3.0, 5.0]] * 5)
    pc, pr, rc, rr = policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1]
    losses, c, r = pair_losses(PreferenceLoss("dpo", beta=0.2), policy, ref, n)
    assert torch.allclose(losses, -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr))))
    assert torch.allclose(c, 0.2 * (pc - rc)) and torch.allclose(r, 0.2 * (pr - rr))
    losses, _, _ = pair_losses(PreferenceLoss("ipo", beta=0.2), policy, ref, n)
    assert torch.allclose(losses, ((pc - rc) / 3 - (pr - rr) / 5 - 1 / 0.4) ** 2)
    losses, c, _ = pair_losses(PreferenceLoss("simpo", beta=2.0, gamma=0.7), policy, None, n)
    assert torch.allclose(losses, -F.logsigmoid(2.0 * (pc / 3 - pr / 5) - 0.7))
    assert torch.allclose(c, 2.0 * pc / 3)
    losses, _, _ = pair_losses(PreferenceLoss("orpo", lam=0.3), policy, None, n)
    ac, ar = pc / 3, pr / 5
    odds = (ac - torch.log(1 - ac.exp())) - (ar - torch.log(1 - ar.exp()))
    assert torch.allclose(losses, -ac - 0.3 * F.logsigmoid(odds))


def test_pair_formats_and_the_scored_tokens(setup, tmp_path):
    book = parse_pair({"instruction": "Add.", "input": "2 2", "chosen": "4", "rejected": "5"})
    assert (book.chosen.instruction, book.chosen.input, book.chosen.output, book.rejected.output) == \
        ("Add.", "2 2", "4", "5")
    plain = parse_pair({"prompt": "Hi", "chosen": "Hello", "rejected": "Go"})
    assert plain.chosen.instruction == "Hi" and not plain.chosen.is_chat
    conv = parse_pair({"prompt": [{"role": "user", "content": "Hi"}],
                       "chosen": [{"role": "assistant", "content": "Hello"}],
                       "rejected": [{"role": "assistant", "content": "Go"}]})
    assert [m.role for m in conv.chosen.messages] == ["user", "assistant"]
    hi = {"role": "user", "content": "Hi"}
    shared = parse_pair({"chosen": [hi, {"role": "assistant", "content": "A"}],
                         "rejected": [hi, {"role": "assistant", "content": "B"}]})
    assert shared.rejected.messages[-1].content == "B"
    # an earlier assistant turn of the prompt is context: only the last run of targets is scored
    assert final_response_only([IGNORE_INDEX, 4, 5, IGNORE_INDEX, 6, 7]) == [IGNORE_INDEX] * 4 + [6, 7]


def test_chat_template_pairs_score_the_response_and_end_of_turn_only(setup, tmp_path):
    from microft.data.preference import PairRead, load_pairs
    from microft.data.tokenizer_files import tokenizer_for
    from microft.weights import read_json

    tok = tokenizer_for(str(setup["model"]), type("C", (), {"model_type": "qwen3", "vocab_size": 640})())
    pair = parse_pair({"prompt": [{"role": "user", "content": "Say red."}],
                       "chosen": [{"role": "assistant", "content": "red"}],
                       "rejected": [{"role": "assistant", "content": "blue"}]}, "x:1")
    cfg = RunConfig(model=str(setup["model"]), template="auto", val_frac=0.0)
    data = load_pairs(cfg, 128, tok, (PairRead([pair]), None))
    s = data.train[0]
    scored = [t for t in s["chosen_labels"] if t != IGNORE_INDEX]
    assert tok.decode(scored) == "red<|im_end|>"  # ChatML's newline after <|im_end|> is not a response token
    assert read_json(setup["model"] / "tokenizer_config.json")["eos_token"]["content"] == "<|im_end|>"


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same"),
    ({"prompt": "p", "chosen": "c"}, "expected 'chosen' and 'rejected'"),
    ({"instruction": "", "chosen": "c", "rejected": "r"}, "'instruction' is empty"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant",
                                                                                 "content": "y"}]},
     "must be from the assistant"),
])
def test_bad_pairs_are_one_line_each(tmp_path, record, problem):
    with pytest.raises(DataError, match=problem):
        parse_pair(record)
    path = tmp_path / "d.jsonl"
    plain = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(record) + "\n" + json.dumps(plain) + "\n")
    with pytest.raises(DataError, match=f"line 1: .*{problem}.*--skip-bad"):
        read_pairs(str(path))
    got = read_pairs(str(path), skip_bad=True)
    assert len(got.pairs) == 1 and got.n_skipped == 1


def test_cli_runs_dpo_and_refuses_bad_data_and_a_long_prompt_in_one_line(setup, tmp_path):
    base = ["dpo", "--model", str(setup["model"]), "--template", str(setup["template"]), "--micro-bs", "2",
            "--accum", "1", "--max-steps", "2", "--device", "cpu", "--precision", "fp32", "--log-format",
            "json"]
    res = runner.invoke(app, [*base, "--data", str(setup["data"]), "--out", str(tmp_path / "ok"), "--loss",
                              "simpo", "--gamma", "0.3"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["steps"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    res = runner.invoke(app, [*base, "--data", str(bad), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "are the same" in res.output and "Traceback" not in res.output
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "Say red and blue. " * 40 if i == 0 else "Hi.\n", "chosen": "red", "rejected": "blue"}
            for i in range(6)]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, [*base, "--data", str(long), "--out", str(tmp_path / "long"), "--max-seq-len",
                              "32", "--val-frac", "0"])
    assert res.exit_code == 2 and "leaving no room" in res.output
    res = runner.invoke(app, [*base, "--data", str(long), "--out", str(tmp_path / "skip"), "--max-seq-len",
                              "32", "--val-frac", "0", "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert "5 train / 0 val pairs; 1 bad pairs skipped" in res.output


@pytest.mark.parametrize("kw", [dict(), dict(precision="bf16-mixed"), dict(lora=True),
                                dict(lora=True, precision="bf16-mixed"),
                                dict(lora=True, quantize="nf4", precision="bf16-mixed")],
                         ids=["full", "full-bf16", "lora", "lora-bf16", "qlora-bf16"])
def test_the_reference_is_the_starting_model_so_step_one_prefers_nothing(setup, tmp_path, kw):
    """Before the first update the policy is its reference (a frozen copy, or the base with the adapters off,
    whose B = 0): every log-ratio is exactly 0, the loss exactly ln 2, in any precision."""
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "run", max_steps=2, eval_every=1, val_frac=0.25, **kw), events.append)
    first = next(e for e in events if e["kind"] == "step")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals[0]["rewards/margins"] == 0.0 and evals[-1]["rewards/margins"] != 0.0
    assert all(math.isfinite(e["loss"]) for e in events if e["kind"] == "step")


def test_conversational_pairs_with_the_chat_template_and_a_validation_file(setup, tmp_path):
    def conv(i: int) -> dict:
        a, b = WORDS[i % 8], WORDS[(5 * i + 2) % 8]
        return {"prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"Say {a}."}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": f"{b} {b}"}]}

    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.json"
    train_file.write_text("".join(json.dumps(conv(i)) + "\n" for i in range(8)))
    val_file.write_text(json.dumps([conv(i) for i in range(8, 12)]))
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "run", data=str(train_file), val_data=str(val_file), template="auto",
                    eval_every=2, max_steps=2), events.append)
    banner = next(e for e in events if e["kind"] == "banner")
    assert banner["data_stats"].startswith("8 train / 4 val pairs")
    assert [e["step"] for e in events if e["kind"] == "eval"] == [0, 2]


def estimate(*flags: str) -> dict:
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--micro-bs", "2", "--seq-len", "64",
                              "--precision", "fp32", "--json", *flags])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_estimate_mem_models_the_preference_step_and_its_reference_byte_exact_to_the_trace():
    """`--method dpo` answers from the analytical replay by default, to the byte what `--trace` measures; the
    reference is a second set of weights only where it is a frozen copy (full fine-tuning, not
    precomputed)."""
    sft = estimate()
    runs = {name: estimate("--method", "dpo", *flags) for name, flags in {
        "full": (), "cached": ("--precompute-ref",), "orpo": ("--loss", "orpo"), "lora": ("--lora",),
        "ipo-lora-ckpt": ("--loss", "ipo", "--lora", "--grad-ckpt", "--precision", "bf16-mixed"),
    }.items()}
    full, cached, orpo, lora = (runs[k] for k in ("full", "cached", "orpo", "lora"))
    assert full["engine"] == "analytical" and "microft dpo --loss dpo" in full["notes"][0]
    assert "microft dpo --loss dpo" in full["estimated"]
    weights = sft["components"]["weights"]
    assert full["components"]["weights"] == 2 * weights  # the frozen reference copy
    assert cached["components"]["weights"] == weights == orpo["components"]["weights"]  # no reference model
    assert full["peak_bytes"] > cached["peak_bytes"] > sft["peak_bytes"]  # two sequences a pair
    assert lora["components"]["weights"] < 1.1 * weights  # the base with the adapters off: no copy
    ckpt = ("--loss", "ipo", "--lora", "--grad-ckpt", "--precision", "bf16-mixed")
    for name, flags in {"full": (), "lora": ("--lora",), "ipo-lora-ckpt": ckpt}.items():
        traced = estimate("--method", "dpo", "--trace", *flags)
        assert traced["engine"] == "trace"
        assert traced["peak_bytes"] == runs[name]["peak_bytes"]
        assert traced["components"] == runs[name]["components"]


def plan(*flags: str) -> tuple[int, dict]:
    res = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--method", "dpo", "--seq-len", "64",
                              "--precision", "fp32", "--json", *flags])
    assert res.exit_code in (0, 3, 4), res.output
    return res.exit_code, json.loads(res.output)


def test_the_planner_plans_the_preference_step_with_exit_codes():
    """With --gpu-mem: fits as asked (0), fits with the recommended change (4), nothing fits (3); the plan's
    strategies are preference steps (a LoRA row drops the frozen copy: its reference is the base)."""
    code, asked = plan("--micro-bs", "8", "--gpu-mem", "80GB")
    assert code == 0 and asked["verdict"] == "fits as asked" and asked["plan"]["recommended"]["micro_bs"] == 8
    code, tight = plan("--micro-bs", "8", "--gpu-mem", f"{asked['total_bytes'] - 1}b")
    rec = tight["plan"]["recommended"]
    assert code == 4 and tight["fits"] is False and rec["fits"] and rec["micro_bs"] * rec["accum"] == 8
    code, small = plan("--micro-bs", f"{rec['micro_bs']}", "--accum", f"{rec['accum']}",
                       "--gpu-mem", f"{asked['total_bytes'] - 1}b")
    assert code == 0 and small["total_bytes"] == rec["total_bytes"]  # the plan's row is that run's estimate
    code, none = plan("--micro-bs", "8", "--gpu-mem", "100MiB")
    assert code == 3 and none["plan"]["recommended"] is None and none["verdict"] == "nothing fits"


def test_micro_bs_auto_plans_the_largest_preference_micro_batch_that_fits():
    budget = "740MiB"
    code, auto = plan("--micro-bs", "auto", "--gpu-mem", budget, "--lora")
    m = auto["run"]["micro_bs"]
    assert code == 0 and m > 1
    assert plan("--micro-bs", str(m), "--gpu-mem", budget, "--lora")[0] == 0
    assert plan("--micro-bs", str(m + 1), "--gpu-mem", budget, "--lora")[1]["fits"] is False
    sft = runner.invoke(app, ["estimate-mem", "--model", "gpt2-tiny", "--seq-len", "64", "--precision",
                              "fp32", "--json", "--micro-bs", "auto", "--gpu-mem", budget, "--lora"])
    assert json.loads(sft.output)["run"]["micro_bs"] > m  # a pair is two sequences (and a reference forward)


def test_dpo_micro_bs_auto_runs_the_planned_micro_batch(setup, tmp_path):
    """`microft dpo --micro-bs auto`: the planner's micro-batch of pairs for this machine's memory (here the
    CPU's), at most the training pairs of one step; the run's banner estimate is the preference step's."""
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "run", micro_bs="auto", accum=1, max_steps=1), events.append)
    note = next(e["text"] for e in events if e["kind"] == "note" and "--micro-bs auto" in e["text"])
    assert "16 = 16 (micro) × 1 (accum)" in note, note
    assert [e for e in events if e["kind"] == "step"]


def test_a_cpu_dpo_run_reports_the_traced_peak_estimate_mem_gives(setup, tmp_path):
    """The run's summary (CPU) carries the trace of its own step at its --max-seq-len (here the model's
    context): the very number `estimate-mem --method dpo` prints for the same flags."""
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "run", max_steps=1, lora=True, lora_targets="q_proj,v_proj"),
            events.append)
    summary = next(e for e in events if e["kind"] == "summary")
    res = runner.invoke(app, ["estimate-mem", "--model", str(setup["model"]), "--method", "dpo", "--lora",
                              "--lora-targets", "q_proj,v_proj", "--micro-bs", "2", "--accum", "2",
                              "--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0",
                              "--max-grad-norm", "0", "--precision", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    assert summary["traced_peak"] == json.loads(res.output)["peak_bytes"] > 0


def trl_reference_free(setup, out: Path, kind: str) -> list[dict]:
    """TRL's CPOTrainer as SimPO (loss_type simpo, cpo_alpha 0), or its ORPOTrainer (lambda: its beta), on the
    same model, data in file order, SGD; one pair a micro-step × 4 (the mean over pairs); its step logs."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in setup["data"].read_text().splitlines()]
    common = dict(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=4,
                  max_steps=4, learning_rate=0.05, lr_scheduler_type="constant", warmup_steps=0, optim="sgd",
                  weight_decay=0.0, max_grad_norm=0.0, beta=0.1, bf16=False, gradient_checkpointing=False,
                  report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, seed=3,
                  train_sampling_strategy="sequential")
    if kind == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        common.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5)
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(setup["model"])
    trainer = Trainer(model=model, args=Config(**common), train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_simpo_equals_trls_cpo_trainer_as_simpo_step_for_step(setup, tmp_path):
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "mft", loss="simpo", beta=0.1, gamma=0.5), events.append)
    logs = trl_reference_free(setup, tmp_path / "trl", "simpo")
    assert step_losses(events) == pytest.approx([h["loss"] for h in logs], rel=1e-5, abs=1e-6)
    ours = [e["rewards/margins"] for e in events if e["kind"] == "step"]
    assert ours == pytest.approx([h["rewards/margins"] for h in logs], rel=1e-4, abs=1e-6)
    assert len(set(step_losses(events))) == 4


def test_orpo_odds_ratio_term_equals_trls_orpo_trainer(setup, tmp_path):
    """ORPO's rewards (lambda × the mean log-probs) and so its odds ratio agree with TRL's ORPOTrainer at the
    first step; its loss does not, by design: TRL's NLL term also counts the prompt's tokens, microft's the
    chosen response's only (the tokens every other preference loss scores)."""
    events: list[dict] = []
    run_dpo(dpo_cfg(setup, tmp_path / "mft", loss="orpo", orpo_lambda=0.1, max_steps=1), events.append)
    first = trl_reference_free(setup, tmp_path / "trl", "orpo")[0]
    step = next(e for e in events if e["kind"] == "step")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert step[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key
    assert step["loss"] != pytest.approx(first["loss"], rel=1e-3)  # the NLL terms count different tokens


def test_estimate_mem_reads_the_pairs_longest_side_from_data(setup):
    from microft.data.instruct import split_records

    tok = transformers.AutoTokenizer.from_pretrained(setup["model"])
    rows = [json.loads(line) for line in setup["data"].read_text().splitlines()]
    rows = split_records(rows, RunConfig().val_frac, 0.0, RunConfig().seed).train  # the run's training pairs
    # a side's input ids: prompt and response, and the EOS whose target the last id predicts (shifted away)
    longest = max(len(tok(r["prompt"] + r[side])["input_ids"]) for r in rows
                  for side in ("chosen", "rejected"))
    res = runner.invoke(app, ["estimate-mem", "--model", str(setup["model"]), "--data", str(setup["data"]),
                              "--template", str(setup["template"]), "--method", "dpo",
                              "--micro-bs", "2", "--lora", "--json"])
    assert res.exit_code == 0, res.output
    note = json.loads(res.output)["notes"][0]
    assert f"from --data: {len(rows)} training pairs, longest side {longest} tokens" in note, note
