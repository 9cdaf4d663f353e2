"""The preference step's log-prob head (train/preference.py `_ResponseLogps`): autograd's values, less memory.

The reference is the head through plain autograd, a chunk of rows at a time (what the step ran before): the
same log-probs and the same gradients bit for bit, in fp32, under bf16 autocast and in bf16, with Granite's
scaled and Gemma 2's soft-capped logits, with LoRA; but for the head's own gradient, where the order of a sum
differs: in fp32 and bf16 its chunks after the first are summed in by addmm_, and a tied embedding's rows
that the batch holds are added to it in place (`HeadGradLink`, as the LM loss does). Its backward holds one
head-sized gradient where autograd's made one per chunk and summed a second for the tied embedding.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from microft.memory.estimate import load_shape
from microft.memory.sim import cuda_bytes
from microft.memory.trace import LiveBytes
from microft.models.config import IGNORE_INDEX, ce_chunk_rows
from microft.models.families import FAMILIES
from microft.models.transformer import Transformer
from microft.train.preference import sequence_logps

# (preset, precision): vocabulary and rows such that the head takes three chunks, the last short
CASES = [("llama-tiny", "fp32"), ("llama-tiny", "bf16-mixed"), ("llama-tiny", "bf16-true"),
         ("qwen2-tiny", "fp32"), ("gemma2-tiny", "bf16-mixed"), ("granite-tiny", "fp32")]


def autograd_logps(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's summed target log-probs, the head through autograd a chunk of rows at a time."""
    N, T = y.shape
    pos = (y != IGNORE_INDEX).view(-1).nonzero().squeeze(1)
    h = model.hidden(x).reshape(N * T, -1).index_select(0, pos)
    t = y.reshape(-1).index_select(0, pos).unsqueeze(1)
    rows = ce_chunk_rows(h.size(0), model.config.padded_vocab_size)
    lp = torch.cat([torch.log_softmax(model.logits(h[s : s + rows]).float(), -1).gather(1, t[s : s + rows])
                    .squeeze(1) for s in range(0, h.size(0), rows)])
    return torch.zeros(N).index_add(0, pos // T, lp)


def model_and_batch(preset: str, precision: str, lora: bool = False, n_embd: int | None = None):
    torch.manual_seed(0)
    update = {"vocab_size": 65000, **({"n_embd": n_embd} if n_embd else {})}  # 65,024 rows padded
    model = Transformer(load_shape(preset).model_copy(update=update))
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if lora:
        from microft.models.lora import apply_lora

        apply_lora(model, 4, 8, 0.0, "all")
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave A without a gradient
                torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, 64, (6, 160))  # ids below 64: most embedding rows take no gradient from the batch
    y = torch.randint(0, 65000, (6, 160))
    y[:, :40] = IGNORE_INDEX  # prompts
    return model, x, y


def run(fn, model, x, y, precision):
    """(log-probs, each parameter's gradient) of fn's sums, weighted per row as a loss weighs them."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
        sums = fn(model, x, y)
    w = torch.linspace(-1.0, 2.0, sums.numel())
    (sums * w).sum().backward()
    return sums.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def logps(model, x, y):
    return sequence_logps(model, x, y)[0]


@pytest.mark.parametrize("preset,precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_the_head_gives_autograds_log_probs_and_gradients(preset, precision):
    model, x, y = model_and_batch(preset, precision)
    rows = int((y != IGNORE_INDEX).sum())
    assert len(range(0, rows, ce_chunk_rows(rows, model.config.padded_vocab_size))) == 3
    want, want_g = run(autograd_logps, model, x, y, precision)
    got, got_g = run(logps, model, x, y, precision)
    assert torch.equal(got, want)
    assert got_g.keys() == want_g.keys()
    tied = model.config.tie_embeddings
    head = "wte.weight" if tied else "lm_head.weight"
    for name, g in want_g.items():
        if name != head:
            assert torch.equal(got_g[name], g), name
            continue
        if precision == "bf16-mixed":  # the chunks' bf16 products widened and summed in autograd's order
            rows = torch.ones(g.size(0), dtype=torch.bool)
            rows[x.unique()] = not tied  # the tied embedding's own rows are added in another order
            assert torch.equal(got_g[name][rows], g[rows]), name
        # fp32, bf16-true: chunks 2 and 3 summed in by addmm_ (the same rounding as mm + add on some CPUs)
        tol = 1e-2 if precision == "bf16-true" else 1e-6
        assert torch.allclose(got_g[name], g, rtol=1e-4 if tol < 1e-2 else tol, atol=tol), name


@pytest.mark.parametrize("preset", [f.tiny for f in FAMILIES.values()])
def test_every_family_gets_its_own_logits(preset):
    """The head forms the logits as Transformer.logits does for each family (Granite's scaling, Gemma 2's cap,
    whatever a new family adds): the same log-probs and gradients as autograd through `model.logits`."""
    torch.manual_seed(0)
    model = Transformer(load_shape(preset))
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    y = torch.randint(0, model.config.vocab_size, (2, 12))
    y[:, :4] = IGNORE_INDEX
    want, want_g = run(autograd_logps, model, x, y, "fp32")
    got, got_g = run(logps, model, x, y, "fp32")
    assert torch.equal(got, want)
    for name, g in want_g.items():  # one chunk: the head's gradient too, but a tied embedding's batch rows
        assert torch.allclose(got_g[name], g, rtol=1e-5, atol=1e-7) if name == "wte.weight" else \
            torch.equal(got_g[name], g), name


def test_with_lora_the_frozen_head_passes_autograds_gradient_to_the_adapters():
    model, x, y = model_and_batch("qwen2-tiny", "bf16-mixed", lora=True)
    want, want_g = run(autograd_logps, model, x, y, "bf16-mixed")
    got, got_g = run(logps, model, x, y, "bf16-mixed")
    assert torch.equal(got, want)
    assert got_g.keys() == want_g.keys() and any("lora_A" in n for n in got_g)
    for name, g in want_g.items():
        assert torch.equal(got_g[name], g), name


class HeadSized(LiveBytes):
    """The most storages of `sizes` bytes alive at once (what the op outputs allocate; real tensors)."""

    def __init__(self, sizes: set[int]):
        super().__init__()
        self.sizes, self.most = {cuda_bytes(n) for n in sizes}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                and cuda_bytes(t.untyped_storage().nbytes()) in self.sizes]
        if made:  # only a new one can raise the count
            live = sum(1 for r in self.recs.values() if r.nbytes in self.sizes and not r.ref.expired())
            self.most = max(self.most, live)
        return out


def test_the_backward_holds_one_head_sized_gradient():
    """A tied head in fp32: autograd's per-chunk head held three head-sized gradients at once (a chunk's, its
    padded copy, their running sum; then the embedding's own and the total); this one holds only the
    gradient it fills, to which the embedding's backward adds its rows."""
    model, x, y = model_and_batch("qwen2-tiny", "fp32", n_embd=96)
    x, y, cfg = x[:3], y[:3], model.config  # two chunks
    most = {}
    for name, fn in (("autograd", autograd_logps), ("head", logps)):
        model.zero_grad(set_to_none=True)
        tracker = HeadSized({cfg.vocab_size * 96 * 4, cfg.padded_vocab_size * 96 * 4})
        for p in model.parameters():  # the weight itself counts once
            tracker.track(p)
        with tracker:
            (fn(model, x, y) * torch.linspace(-1.0, 2.0, 3)).sum().backward()
        most[name] = tracker.most - 1
    assert most["head"] == 1 and most["autograd"] >= 3, most
