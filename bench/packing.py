"""Real (non-padding) tokens per second on instruction data: packed vs length-grouped vs transformers.

    .venv/bin/python bench/packing.py                                  # gpt2 124M, writes the doc section
    .venv/bin/python bench/packing.py --model gpt2-tiny --steps 4 --no-write   # a quick check

The data: ~1,000 synthetic Alpaca-format records (instruction, optional input, output) whose
lengths follow a log-normal spread like Alpaca's (most answers short, a long tail), tokenised by
microft's Alpaca template with the prompt masked. Every configuration trains on the same steps: the
same global batch of samples per step, drawn from the seed (microft's sampler), and counts only real
tokens. microft packed (--packing: whole samples in rows of --max-seq-len), microft length-grouped
(its default: similar lengths per micro-batch, padded to the longest), and transformers'
GPT2LMHeadModel with a padded collate (random order, padded to each micro-batch's longest, as its
Trainer does by default) and fused AdamW. Runs are interleaved over rounds; CPU time per step is
recorded beside wall time, since other jobs on the machine stretch wall time. Only the
`## Packed instruction batches` section of docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import random
import resource
import sys
import tempfile
import time

import torch
from docs_section import publish
from harness import DOC, command_line, load_average, machine, model_label, table

from microft.config import BatchPlan, RunConfig
from microft.data.batches import epoch_batches, micro_batches, sample_length
from microft.data.instruct import build_samples, parse_record
from microft.data.tokenizer import encode
from microft.models.config import ModelConfig
from microft.train.loop import train
from microft.train.step import resolve_precision

HEADING = "## Packed instruction batches"
WORDS = ("the model data train answer question explain list write describe give short example number city "
         "history science water energy people language code function value result because however first "
         "second third important simple reason step method").split()


def synthetic_alpaca(n: int, seed: int) -> list[dict]:
    """Alpaca-shaped records: instruction ~ 8-40 words, an input on 40 %, log-normal outputs
    (median ~60 words)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, k))).capitalize() + "."

    out = []
    for _ in range(n):
        rec = {"instruction": words(rng.randint(8, 40)), "output": words(int(rng.lognormvariate(4.1, 0.8)))}
        if rng.random() < 0.4:
            rec["input"] = words(int(rng.lognormvariate(3.0, 0.7)))
        out.append(rec)
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_microft(samples, model_name: str, packing: bool, a) -> dict:
    from microft.models.load import load_model

    torch.manual_seed(0)
    model = load_model(model_name)
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(out=out, precision=a.precision, device="cpu", seed=a.seed, lr=3e-4, warmup=0,
                        eval_every=0, log_format="plain", max_steps=a.warmup + a.steps,
                        max_seq_len=a.max_seq_len, group_by_length=True, packing=packing)
        events: list[dict] = []
        marks: list[float] = []

        def on_event(e):
            if e["kind"] == "step":
                events.append(e)
                marks.append(cpu_seconds())

        train(model, samples, None, cfg, BatchPlan(micro_bs=a.micro_bs, accum=a.global_bs // a.micro_bs),
              on_event)
    timed = events[a.warmup :]
    tokens = sum(e["tokens_per_sec"] * e["step_time"] for e in timed)
    wall = sum(e["step_time"] for e in timed)
    return {"tokens": tokens, "wall": wall, "cpu": marks[-1] - marks[a.warmup - 1] if a.warmup else None}


def run_transformers(samples, model_name: str, a) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = ModelConfig.from_preset(model_name)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=mc.vocab_size, n_positions=mc.n_positions, n_embd=mc.n_embd,
                                       n_layer=mc.n_layer, n_head=mc.n_head, attn_implementation="sdpa"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    precision = resolve_precision(a.precision, torch.device("cpu"))
    lengths = [sample_length(s) for s in samples]
    batches = epoch_batches(len(samples), a.global_bs, a.seed, 0)  # random order: no length grouping
    tokens = wall = cpu = 0.0
    for step in range(a.warmup + a.steps):
        idx = batches[step]
        t0, c0 = time.perf_counter(), cpu_seconds()
        for s in range(0, len(idx), a.micro_bs):
            mb = [samples[i] for i in idx[s : s + a.micro_bs]]
            T = max(sample_length(x) for x in mb)
            ids = torch.full((len(mb), T), 0, dtype=torch.long)
            labels = torch.full((len(mb), T + 1), -100, dtype=torch.long)  # HF shifts labels itself
            att = torch.zeros((len(mb), T), dtype=torch.long)
            for b, x in enumerate(mb):
                n = sample_length(x)
                ids[b, :n], att[b, :n] = torch.as_tensor(x["input_ids"]), 1
                labels[b, 1 : n + 1] = torch.as_tensor(x["labels"])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                logits = model(input_ids=ids, attention_mask=att).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            wall += time.perf_counter() - t0
            cpu += cpu_seconds() - c0
            tokens += sum(lengths[i] for i in idx)
    return {"tokens": tokens, "wall": wall, "cpu": cpu}


def padding_share(samples, a, packed: bool) -> tuple[float, float, float, float]:
    """(padding as a share of the positions computed, micro-steps per step, attention scores per step,
    the same with a block-diagonal mask over the whole row) over the timed steps' micro-batches.
    On a CPU packed rows attend sample by sample (`segment_attention`); CUDA masks the whole row."""
    from microft.data.batches import packed_micro_batches

    lengths = [sample_length(s) for s in samples]
    batches = epoch_batches(len(samples), a.global_bs, a.seed, 0, lengths)
    real = total = n_micro = scores = masked = 0
    steps = batches[a.warmup : a.warmup + a.steps]
    for idx in steps:
        if packed:
            mbs = [[[lengths[i] for i in r] for r in mb]
                   for mb in packed_micro_batches(idx, lengths, a.micro_bs, a.max_seq_len)]
        else:
            mbs = [[[lengths[i]] for i in mb] for mb in micro_batches(idx, lengths, a.micro_bs)]
        for rows in mbs:
            T = max(sum(r) for r in rows)
            real, total = real + sum(map(sum, rows)), total + len(rows) * T
            n_micro, masked = n_micro + 1, masked + len(rows) * T**2
            # per sample (a packed row's tail padding is one more segment); unpacked rows pad to T
            scores += (sum(n * n for r in rows for n in r + [T - sum(r)]) if packed else len(rows) * T**2)
    return 1 - real / total, n_micro / len(steps), scores / len(steps), masked / len(steps)


def segment_attention_ratio(samples, a, repeats: int = 3) -> tuple[float, float]:
    """CPU seconds of one layer's attention (forward + backward) over the first packed micro-batch of the
    timed steps: per sample (`segment_attention`, as a CPU runs packed rows) ÷ SDPA with the block-diagonal
    mask (as CUDA does). Returns (masked seconds, ratio)."""
    import torch.nn.functional as F

    from microft.data.batches import packed_micro_batches
    from microft.models.transformer import packed_attention_mask, segment_attention

    cfg = ModelConfig.from_preset(a.model)
    lengths = [sample_length(s) for s in samples]
    idx = epoch_batches(len(samples), a.global_bs, a.seed, 0, lengths)[a.warmup]
    rows = [[lengths[i] for i in r] for r in packed_micro_batches(idx, lengths, a.micro_bs, a.max_seq_len)[0]]
    T = max(sum(r) for r in rows)
    segs = [r + ([T - sum(r)] if T > sum(r) else []) for r in rows]  # a row's tail padding: one more segment
    pos = torch.cat([torch.cat([torch.arange(n) for n in r])[None] for r in segs])
    mask = packed_attention_mask(pos)
    bf16 = resolve_precision(a.precision, torch.device("cpu")).startswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(rows), cfg.n_head, T, cfg.head_dim, generator=g, dtype=dtype,
                           requires_grad=True)
               for _ in range(3))
    dy = torch.randn(q.shape, generator=g, dtype=dtype)

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dy)

    def per_segment():  # what the model runs on a CPU
        segment_attention(q, k, v, tuple(segs),
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                          ).backward(dy)

    def cpu_time(fn) -> float:
        fn()
        c0 = cpu_seconds()
        for _ in range(repeats):
            fn()
        return (cpu_seconds() - c0) / repeats

    t_mask, t_seg = cpu_time(masked), cpu_time(per_segment)
    return t_mask, t_seg / t_mask


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--global-bs", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_before = load_average()
    records = [parse_record(r) for r in synthetic_alpaca(a.records, a.seed)]
    samples, _ = build_samples(records, "alpaca", encode, a.max_seq_len)
    lengths = sorted(sample_length(s) for s in samples)
    runs = {"microft packed": lambda: run_microft(samples, a.model, True, a),
            "microft length-grouped": lambda: run_microft(samples, a.model, False, a),
            "transformers padded collate": lambda: run_transformers(samples, a.model, a)}
    pooled: dict[str, dict] = {k: {"tokens": 0.0, "wall": 0.0, "cpu": 0.0} for k in runs}
    for r in range(a.rounds):
        for name, fn in runs.items():
            print(f"[packing] round {r + 1}/{a.rounds}: {name} ...", file=sys.stderr, flush=True)
            res = fn()
            for k in pooled[name]:
                pooled[name][k] += res[k] or 0.0
    base = pooled["microft length-grouped"]
    pad = {"microft packed": padding_share(samples, a, True),
           "microft length-grouped": padding_share(samples, a, False)}
    rows = [[name, f"{p['tokens'] / p['wall']:.0f}", f"{p['tokens'] / p['cpu']:.0f}" if p["cpu"] else "-",
             f"{100 * pad[name][0]:.1f} %, {pad[name][1]:.1f} micro-steps/step, {pad[name][2] / 1e6:.2f} M "
             "attention scores/step per head and layer" if name in pad
             else "random order, padded to the longest",
             f"{(p['tokens'] / p['wall']) / (base['tokens'] / base['wall']):.2f}×"]
            for name, p in pooled.items()]
    packed, hf = pooled["microft packed"], pooled["transformers padded collate"]
    t_mask, seg_ratio = segment_attention_ratio(samples, a)
    speedup = (packed["tokens"] / packed["wall"]) / (base["tokens"] / base["wall"])
    cpu_speedup = (packed["tokens"] / packed["cpu"]) / (base["tokens"] / base["cpu"])
    body = (f"Command: {command_line()} ({started}). {machine('cpu')}. Load average (1/5/15 min) before: "
            f"{load_before}, after: {load_average()}.\n\n"
            f"Data: {len(samples)} synthetic Alpaca-format records (log-normal lengths: median "
            f"{lengths[len(lengths) // 2]} tokens, 90th percentile {lengths[int(0.9 * len(lengths))]}, "
            f"longest {lengths[-1]}; prompt masked). {model_label(a.model)}, precision {a.precision} "
            f"({resolve_precision(a.precision, torch.device('cpu'))}), global batch {a.global_bs} samples, "
            f"micro-batch {a.micro_bs} (rows of up to {a.max_seq_len} tokens when packed), {a.warmup} "
            f"warm-up step(s) then {a.steps} timed per run, {a.rounds} interleaved round(s). Tokens/s counts "
            "real tokens only.\n\n"
            + table(["run", "real tokens/s (wall)", "real tokens/s (CPU time)", "padding",
                     "vs length-grouped"], rows)
            + f"\n\n- packed vs length-grouped: {speedup:.2f}× real tokens/s ({cpu_speedup:.2f}× on "
            f"CPU time); target ≥ 1.3×: {'met' if speedup >= 1.3 else '**not met**'}. Packed vs "
            f"transformers: {(packed['tokens'] / packed['wall']) / (hf['tokens'] / hf['wall']):.2f}×."
            f"\n- Why so close: length grouping sorts each global batch by length before cutting it into "
            f"micro-batches, so it pads only {100 * pad['microft length-grouped'][0]:.1f} % of the "
            "positions it computes, and packing can save at most that. What packing changes is the shape of "
            f"the work: {pad['microft packed'][1]:.1f} micro-steps per step instead of "
            f"{pad['microft length-grouped'][1]:.1f}, of rows up to {a.max_seq_len} tokens. On a CPU its "
            "rows attend sample by sample (`transformer.segment_attention`: each row split at its samples' "
            f"boundaries, causal attention per sample, exact), which took {seg_ratio:.2f}× the CPU time of "
            "SDPA with the block-diagonal mask for one layer's forward + backward on the first packed "
            f"micro-batch ({1e3 * t_mask:.0f} ms masked, "
            "`segment_attention_ratio`); the mask, which CUDA uses, attends over "
            f"{pad['microft packed'][3] / pad['microft packed'][2]:.1f}× the scores.")
    publish(DOC, HEADING, body, not a.no_write, "packing")
    return {"speedup": speedup, "cpu_speedup": cpu_speedup}


if __name__ == "__main__":
    main()
