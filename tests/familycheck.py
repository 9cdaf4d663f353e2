"""The checks every family's tests run, written once: parity with transformers (logits, greedy generation,
export, PEFT adapters, gradients under checkpointing and packing) and, end to end, exact accumulation splits,
bit-exact resume, assistant-only masks and the recipes' estimate lines. Each test file brings its families'
models and calls these."""

from __future__ import annotations

import json
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from microft.config import RunConfig
from microft.errors import Interrupted
from microft.models.config import IGNORE_INDEX
from microft.models.hf import export_hf
from microft.models.load import load_model
from microft.models.lora import apply_lora, load_adapter, merge_lora, save_adapter
from microft.runs import run_finetune
from microft.weights import read_safetensors

LORA_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # PEFT's, Llama's


# --------------------------------------------------------------------------- parity with transformers
def tokens(n: int = 20, vocab: int = 250, batch: int = 2, seed: int = 7) -> torch.Tensor:
    """A fixed batch of token ids."""
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(hf, ours, x) -> float:
    """The largest logit difference between a transformers model and ours on `x`."""
    with torch.no_grad():
        return (hf(x).logits - ours.eval()(x)).abs().max().item()


def save_sharded(hf, d: Path) -> Path:
    """`save_pretrained` in shards small enough that a tiny model has several, with their index."""
    hf.save_pretrained(d, max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


def random_gains_(model: torch.nn.Module) -> None:
    """Move the norms' gains away from their initial value (Gemma's (1 + w) starts at w = 0)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)


def assert_generates_like(hf, ours, n_new: int = 30) -> None:
    """Greedy generation with microft's KV cache gives transformers' tokens."""
    from microft.generate import generate

    prompt = tokens(6, batch=1)
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert list(generate(ours, prompt[0].tolist(), n_new, stop_at_eot=False)) == want


def assert_export_round_trips(hf, ours, out: Path, x: torch.Tensor):
    """`export_hf` (sharded) loads in transformers with every key and equal logits, and microft reads it back
    as the reference model; returns transformers' model of the export."""
    out = export_hf(ours, out, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    back, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(back.eval(), ours, x) <= 1e-5
    assert max_diff(hf, load_model(out), x) <= 1e-5  # and microft reads its own export
    return back


def assert_peft_round_trip(hf, d: Path, adapter: Path, targets: str = "all",
                           want: set[str] | None = None) -> None:
    """LoRA on the model of `d` (random B): PEFT loads the saved adapter onto transformers' model with our
    logits (`want`: its target_modules), microft loads it back, and merging keeps the logits."""
    peft = pytest.importorskip("peft")
    ours = load_model(d)
    apply_lora(ours, r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(adapter, ours, str(d))
    if want is not None:
        assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == want
    peft_model = peft.PeftModel.from_pretrained(type(hf).from_pretrained(d), adapter).eval()
    x = tokens()
    assert max_diff(peft_model, ours, x) <= 1e-5
    assert max_diff(peft_model, load_adapter(load_model(d), adapter), x) <= 1e-5
    with torch.no_grad():
        before = ours(x)
    merge_lora(ours)
    assert not any("lora_" in n for n, _ in ours.named_parameters())
    with torch.no_grad():  # folding B @ A into W rounds differently: fp32 noise on logits of size ~10
        assert torch.allclose(ours(x), before, atol=1e-4, rtol=0)


def loss_and_grads(model: torch.nn.Module, loss: Callable[[], torch.Tensor]
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """One backward of `loss()` from zeroed gradients: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_variants_match(run: Callable[[bool, bool], tuple[float, dict[str, torch.Tensor]]],
                          loss_rtol: float = 1e-4) -> None:
    """`run(checkpointed, variant)` (the variant: the fused loss, packed rows) gives the plain run's loss and
    gradients for each of the three other combinations."""
    ref_loss, ref = run(False, False)
    for ckpt, variant in ((True, False), (False, True), (True, True)):
        loss, got = run(ckpt, variant)
        assert abs(loss - ref_loss) <= loss_rtol * abs(ref_loss)
        for n, g in ref.items():
            torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------- end to end
def chat_file(path: Path, n: int = 24) -> Path:
    """`n` chat records (every third with a system message and a second exchange) as JSONL."""
    words = "red green blue cat dog sun moon tree".split()
    lines = []
    for i in range(n):
        a, b = words[i % 8], words[(3 * i + 1) % 8]
        msgs = [{"role": "user", "content": f"Say {a} and {b}."},
                {"role": "assistant", "content": f"{a} {b}"}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}, *msgs,
                    {"role": "user", "content": "Again, reversed."},
                    {"role": "assistant", "content": f"{b} {a}"}]
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(model: Path, data: Path, out: Path, micro_bs: int, accum: int, **kw: Any) -> RunConfig:
    """A short fp32 CPU fine-tune of `model` on `data` (4 steps, no validation, no samples)."""
    base = dict(model=str(model), data=str(data), out=str(out), micro_bs=micro_bs, accum=accum, max_steps=4,
                max_seq_len=64, precision="fp32", device="cpu", lr=1e-2, warmup=0, val_frac=0.0,
                log_format="plain", samples_per_eval=0, seed=5)
    return RunConfig(**{**base, **kw})


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The final model a run wrote to `out`."""
    return read_safetensors(out / "final" / "model.safetensors")


def splits_finals(config: Callable[..., RunConfig], root: Path, splits) -> dict[Any, dict]:
    """Fine-tune `config(out, micro_bs, accum, **options)` once per (micro_bs, accum) split of one global
    batch (SGD, no clipping, no length grouping): their final weights by split."""
    finals = {}
    for mb, acc in splits:
        out = root / f"{mb}x{acc}"
        cfg = config(out, mb, acc, optimizer="sgd", momentum=0.0, max_grad_norm=None, group_by_length=False)
        run_finetune(cfg, lambda e: None)
        finals[(mb, acc)] = final_weights(out)
    return finals


def assert_same_weights(finals: dict[Any, dict], ref_key: Any) -> None:
    """Every split's final weights within 1e-6 of the reference split's."""
    ref = finals[ref_key]
    for key, w in finals.items():
        for name, t in ref.items():
            assert (w[name] - t).abs().max().item() <= 1e-6, (key, name)


def interrupt_at_2(e: dict) -> None:
    """A run's callback that sends SIGINT at step 2."""
    if e["kind"] == "step" and e["step"] == 2:
        os.kill(os.getpid(), signal.SIGINT)


def assert_resume_is_bit_exact(ref: RunConfig, cut: RunConfig, after_cut: Callable[[], None] | None = None,
                               ref_events: Callable[[dict], None] | None = None) -> None:
    """`cut`, stopped by SIGINT at step 2 and resumed, ends with `ref`'s final weights bit for bit."""
    run_finetune(ref, ref_events or (lambda e: None))
    with pytest.raises(Interrupted):
        run_finetune(cut, interrupt_at_2)
    if after_cut is not None:
        after_cut()
    run_finetune(cut.model_copy(update={"resume": "auto"}), lambda e: None)
    want, got = final_weights(Path(ref.out)), final_weights(Path(cut.out))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def assert_masks_match(samples: list[dict], hf_tok, records: list[list[dict]],
                       last: str | None = None) -> list:
    """microft's chat samples train exactly the tokens transformers' `assistant_masks` mark, up to the last
    one (`last`: that token); returns transformers' ids of each record."""
    assert len(samples) == len(records)
    all_ids = []
    for s, msgs in zip(samples, records, strict=True):
        enc = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        end = max(i for i, m in enumerate(mask) if m)
        if last is not None:
            assert hf_tok.convert_ids_to_tokens(ids[end]) == last  # the turn's end token is trained
        assert s["input_ids"] == ids[:end]  # nothing after the final assistant token is trained
        assert s["labels"] == [t if m else IGNORE_INDEX for t, m in zip(ids[1 : end + 1], mask[1 : end + 1],
                                                                        strict=True)]
        all_ids.append(ids)
    return all_ids


def records_of(data: Path) -> list[list[dict]]:
    """The messages of each record of a chat JSONL file."""
    return [json.loads(line)["messages"] for line in data.read_text().splitlines()]


def greedy_completion(hf, hf_tok, prompt: str, n_new: int, stops: list[int]) -> str:
    """transformers' greedy completion of `prompt` as `generate --json` reports it (stop tokens dropped)."""
    ids = hf_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=stops,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
    # transformers keeps the stop token; microft doesn't
    return hf_tok.decode([t for t in new if t not in stops]).strip()


def recipe_estimates(recipe: str, runner, app, args: tuple[str, ...] = ("--json",)) -> list[tuple[Any, str]]:
    """Run each `# microft estimate-mem` line of `recipes/<recipe>` (two of them): (its answer, the claim the
    line makes); the answer is the parsed JSON where `args` asks for it, else the output."""
    path = Path(__file__).parent.parent / "recipes" / recipe
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("#   microft estimate-mem")]
    assert len(lines) == 2
    out = []
    for line in lines:
        cmd, claim = line.removeprefix("#   microft ").split("#", 1)
        res = runner.invoke(app, [*shlex.split(cmd.replace("recipes/", f"{path.parent}/")), *args])
        if "--json" in args:
            assert res.exit_code == 0, res.output  # 0: fits the budget
            out.append((json.loads(res.output), claim))
        else:
            out.append((res.output, claim))
    return out


def assert_recipe_estimates_hold(recipe: str, runner, app, spare: bool = False) -> None:
    """Each estimate line's fit and peak (and, with `spare`, the memory it leaves under a budget) are what
    estimate-mem says."""
    for est, claim in recipe_estimates(recipe, runner, app):
        assert est["fits"] is True and "fits" in claim
        if "peak " in claim:
            assert f"{est['peak_bytes'] / 2**30:.2f}" == claim.split("peak ")[1].split(" GiB")[0]
        if spare and "budget_bytes" in est:
            left = (est["budget_bytes"] - est["total_bytes"]) / 2**30
            assert f"({left:.1f} GiB spare)" in claim
