"""The optimizers: one entry each in `OPTIMIZERS`, with everything about it side by side.

An entry (`Optimizer`) says, for one `--optimizer` word:
- `reads`: the optimizer-specific hyperparameters it reads (`HYPERPARAMETERS`: `--beta1`, `--momentum`, ...).
  The config refuses one given to an optimizer that would ignore it, and each flag's help names its readers.
  The lr and the weight decay reach every optimizer through its parameter groups (`param_groups`);
- `build`: the torch optimizer over those groups;
- `state`: the tensors it keeps per parameter (key, bytes, dtype): the estimator's optimizer state, and what a
  checkpoint must give back with the same dtypes (torch's `load_state_dict` casts state to the parameter's
  dtype; microft's own classes undo that with `train/optim8bit.load_keeping_dtypes`);
- `replay`: its step's allocations in order, on the estimator's simulator (`memory.sim.Sim`), so that the
  analytical estimate equals the traced real step to the byte;
- `host_state`: state keys torch keeps on the CPU whatever the device (no device memory);
- `ops`: the aten ops its step dispatches beyond those the rest of the step does (as the trace names them):
  the ones the replay accounts for; tests/test_memory_sync.py names any op the real step dispatches that
  neither an entry nor the replay lists.

No torch here: `config` validates `--optimizer` against these names and the analytical estimator replays
the steps without it. `build` imports torch, and microft's own optimizer classes from `train/`
(`master_adamw.py`, `optim8bit.py`, which import neither the config nor this module), when a run calls it:
the one arrow from here up, taken lazily, from an entry to its implementation.

Adding an optimizer: one entry in `OPTIMIZERS` (a class of microft's own in `train/`);
tests/test_optimizers.py then builds, steps, checkpoints and resumes it, and holds its state and replay to
the real optimizer's bytes.
A new hyperparameter also needs its RunConfig field (config.py) and its help in `HYPERPARAMETERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Protocol

from microft.errors import ConfigError
from microft.layouts import ADAMW8_BLOCK, ADAMW8_CHUNK, ADAMW8_MIN_NUMEL, MASTER_CHUNK, NO_DECAY_MARKERS

STATE, TRANSIENT = "optimizer state", "optimizer transients"  # the estimate's components

# The hyperparameters only some optimizers read (each a RunConfig field and a flag): the start of the
# flag's help, which ends with the optimizers whose entry `reads` it.
HYPERPARAMETERS = {
    "beta1": "AdamW's first-moment decay",
    "beta2": "AdamW's second-moment decay",
    "eps": "AdamW's epsilon, added to the root of the second moment",
    "momentum": "SGD's momentum",
}


class Param(Protocol):
    """A trainable parameter as the memory model sees it (`memory.sim.Par`)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    ndim: int
    es: int  # bytes per element


class Sim(Protocol):
    """The part of the estimator's simulator (`memory.sim.Sim`) an optimizer's replay drives."""

    def alloc(self, nbytes: int, cat: str, what: str = "", held: bool = True) -> Any: ...

    def unref(self, st: Any) -> None: ...

    def transient(self, nbytes: int, cat: str, what: str = "") -> None: ...


class StateTensor(NamedTuple):
    """One tensor an optimizer keeps for a parameter: its key in `optimizer.state[p]`, bytes and dtype."""

    key: str
    nbytes: int
    dtype: str | None  # a torch dtype's name ("uint8", "float32", ...); None: the parameter's own


@dataclass(frozen=True)
class Settings:
    """What an optimizer's state and step depend on besides its parameters."""

    bf16_weights: bool = False  # bf16-true: the parameters themselves are bf16
    momentum: float = 0.9  # RunConfig.momentum (sgd)


Groups = list[tuple[list[Any], float]]  # (parameters, weight decay), as `param_groups` makes them
# (torch param groups, RunConfig, torch.device, bf16 weights) -> the torch optimizer
Build = Callable[[list[dict], Any, Any, bool], Any]
StateModel = Callable[[Param, Settings], list[StateTensor]]
Replay = Callable[[Sim, Groups, dict[str, list[Any]], Settings], None]  # (sim, groups, state so far, ...)


@dataclass(frozen=True)
class Optimizer:
    """One optimizer, whole: every field is required, so an entry cannot leave a part out."""

    name: str  # the --optimizer word
    reads: tuple[str, ...]  # HYPERPARAMETERS it reads
    build: Build
    state: StateModel
    replay: Replay
    host_state: tuple[str, ...]  # state keys torch keeps on the CPU (not device memory)
    # fp16's GradScaler: the built optimizer reads the overflow flag itself (`_step_supports_amp_scaling`, as
    # torch's fused AdamW), so scaler.step hands it a flag of its own: one more small tensor in the step
    amp_scaling: bool
    ops: tuple[str, ...]  # aten ops its step dispatches that the rest of the step does not

    def __post_init__(self) -> None:
        unknown = [r for r in self.reads if r not in HYPERPARAMETERS]
        if unknown:
            raise ValueError(f"optimizer {self.name!r} reads {unknown}: not in HYPERPARAMETERS")
        for f in fields(self):
            if f.name in ("build", "state", "replay") and not callable(getattr(self, f.name)):
                raise TypeError(f"optimizer {self.name!r}: {f.name} must be callable")


def decays(name: str, ndim: int) -> bool:
    """Whether weight decay applies to the parameter `name` (matrices yes; biases, norms, embeddings no)."""
    return ndim >= 2 and not any(m in name for m in NO_DECAY_MARKERS)


def new_state(sim: Sim, state: dict[str, list[Any]], p: Param, tensors: list[StateTensor]) -> None:
    """Allocate `p`'s state tensors on the simulator, in order, unless its first step made them already."""
    if p.name not in state:
        state[p.name] = [sim.alloc(t.nbytes, STATE, t.key) for t in tensors]


def _free(sim: Sim, sts: list[Any]) -> None:
    for st in sts:
        sim.unref(st)


# --- adamw: torch's fused AdamW; with bf16-true, train/master_adamw.MasterAdamW ---------------------------
def _adamw_build(groups: list[dict], cfg: Any, device: Any, bf16_weights: bool) -> Any:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if bf16_weights:  # bf16-true: exact fp32 master weights (16 more bits per weight), no update lost
        from microft.train.master_adamw import MasterAdamW

        return MasterAdamW(groups, **kw)
    import torch

    fused = device.type in ("cuda", "cpu", "mps", "xpu")  # torch has a fused kernel there; else foreach
    return torch.optim.AdamW(groups, **kw, **({"fused": True} if fused else {"foreach": True}))


def _adamw_state(p: Param, s: Settings) -> list[StateTensor]:
    if s.bf16_weights:  # bf16 moments and the low 16 bits of each fp32 master weight
        return [StateTensor("step", 4, "float32"), StateTensor("exp_avg", 2 * p.numel, "bfloat16"),
                StateTensor("exp_avg_sq", 2 * p.numel, "bfloat16"),
                StateTensor("master_lo", 2 * p.numel, "int16")]
    return [StateTensor("step", 4, "float32"), StateTensor("exp_avg", p.numel * p.es, None),
            StateTensor("exp_avg_sq", p.numel * p.es, None)]


def _adamw_replay(sim: Sim, groups: Groups, state: dict[str, list[Any]], s: Settings) -> None:
    """Fused AdamW makes its state and no temporaries; MasterAdamW works on fp32 copies of one chunk at a
    time (the first chunk is the largest; each frees its copies)."""
    for params, _ in groups:
        for p in params:
            new_state(sim, state, p, _adamw_state(p, s))
            if s.bf16_weights:
                c = min(p.numel, MASTER_CHUNK)
                work = [sim.alloc(c * 4, TRANSIENT, w)
                        for w in ("master", "exp_avg.float()", "exp_avg_sq.float()")]
                sim.transient(c * 4, TRANSIENT, "grad.float()")
                _free(sim, work)


# --- sgd: torch's SGD (foreach) ------------------------------------------------------------------------
def _sgd_build(groups: list[dict], cfg: Any, device: Any, bf16_weights: bool) -> Any:
    import torch

    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def _sgd_state(p: Param, s: Settings) -> list[StateTensor]:
    return [StateTensor("momentum_buffer", p.numel * p.es, None)] if s.momentum else []


def _sgd_replay(sim: Sim, groups: Groups, state: dict[str, list[Any]], s: Settings) -> None:
    """foreach SGD: weight decay makes new gradients (grad + wd * p), then the momentum buffers."""
    for params, wd in groups:
        tmp = [sim.alloc(p.numel * p.es, TRANSIENT, "grad + wd * p") for p in params] if wd else []
        for p in params:
            new_state(sim, state, p, _sgd_state(p, s))
        _free(sim, tmp)


# --- adafactor: torch's Adafactor (foreach), factored second moments -------------------------------------
def _adafactor_build(groups: list[dict], cfg: Any, device: Any, bf16_weights: bool) -> Any:
    import torch

    if not hasattr(torch.optim, "Adafactor"):
        raise ConfigError("--optimizer adafactor needs torch >= 2.5")
    return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)


def _adafactor_state(p: Param, s: Settings) -> list[StateTensor]:
    if p.ndim >= 2:  # one value per row and per column: shape (..., rows, 1) and (..., 1, cols)
        return [StateTensor("row_var", p.numel // p.shape[-1] * p.es, None),
                StateTensor("col_var", p.numel // p.shape[-2] * p.es, None)]
    return [StateTensor("variance", p.numel * p.es, None)]


def _adafactor_replay(sim: Sim, groups: Groups, state: dict[str, list[Any]], s: Settings) -> None:
    """Per group: the state; then per subgroup (matrices, the rest) its norms, row/column means and variance
    estimates, each subgroup's estimates freed when the next one's exist (`updates` is rebound)."""
    for params, _ in groups:
        for p in params:
            new_state(sim, state, p, _adafactor_state(p, s))
        sub: dict[bool, list[Param]] = {}
        for p in params:
            sub.setdefault(p.ndim >= 2, []).append(p)
        prev: list[Any] = []
        for multidim, ps in sub.items():
            for _ in ps:  # p.norm(2).item()
                sim.transient(4, TRANSIENT, "norm")
            if multidim:
                _free(sim, [sim.alloc(p.numel // p.shape[-1] * p.es, TRANSIENT, "row_means") for p in ps])
                _free(sim, [sim.alloc(p.shape[-1] * p.es, TRANSIENT, "col_means") for p in ps])
                est = [sim.alloc(p.numel * p.es, TRANSIENT, "row_var @ col_var") for p in ps]
                _free(sim, [sim.alloc(p.es, TRANSIENT, "row_var_means") for p in ps])
            else:
                _free(sim, [sim.alloc(p.numel * p.es, TRANSIENT, "grad**2") for p in ps])
                est = [sim.alloc(p.numel * p.es, TRANSIENT, "variance.clone") for p in ps]
            _free(sim, prev)
            for _ in ps:  # update.norm(2).item()
                sim.transient(4, TRANSIENT, "norm")
            prev = est
        _free(sim, prev)


# --- adamw-8bit: train/optim8bit.AdamW8bit, the same bits on every device --------------------------------
def _adamw_8bit_build(groups: list[dict], cfg: Any, device: Any, bf16_weights: bool) -> Any:
    from microft.train.optim8bit import AdamW8bit

    return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _adamw_8bit_state(p: Param, s: Settings) -> list[StateTensor]:
    n = p.numel
    if n < ADAMW8_MIN_NUMEL:  # small tensors keep fp32 moments
        return [StateTensor("exp_avg", 4 * n, "float32"), StateTensor("exp_avg_sq", 4 * n, "float32")]
    nb = -(-n // ADAMW8_BLOCK)  # uint8 codes and an fp32 absmax per block, for each moment
    return [StateTensor(k, size, dt) for m in ("exp_avg", "exp_avg_sq")
            for k, size, dt in ((f"{m}_codes", n, "uint8"), (f"{m}_absmax", 4 * nb, "float32"))]


def _adamw_8bit_replay(sim: Sim, groups: Groups, state: dict[str, list[Any]], s: Settings) -> None:
    """AdamW8bit.step, allocation by allocation. `loc` holds the step's Python locals (the maps, g, m, v, w),
    which live across parameters and groups until step() returns: a rebound local is freed only after its new
    value exists."""
    loc: dict[str, Any] = {}
    for params, _ in groups:
        for p in params:
            new_state(sim, state, p, _adamw_8bit_state(p, s))
            if "maps" not in loc:  # both dynamic maps and their midpoints, for the device, once per step()
                loc["maps"], loc["unsigned map"] = sim.alloc(1024, TRANSIENT, "signed map"), sim.alloc(
                    1024, TRANSIENT, "unsigned map")
                for what in ("signed midpoints", "unsigned midpoints"):
                    loc[what] = _run(sim, [("a", "sum", 1024), ("a", what, 1024), ("f", "sum")])
            quantized = p.numel >= ADAMW8_MIN_NUMEL
            for c in chunk_sizes(p.numel, ADAMW8_CHUNK if quantized else p.numel):
                _adamw_8bit_chunk(sim, loc, c, p.es, quantized)
    _free(sim, list(loc.values()))  # step() returns: its locals die


def _adamw_8bit_chunk(sim: Sim, loc: dict[str, Any], c: int, es: int, quantized: bool) -> None:
    """One chunk of `c` elements: dequantize m and v, the update, requantize (optim8bit's loop body)."""

    def bind(name: str, st: Any) -> None:
        old, loc[name] = loc.get(name), st
        sim.unref(old)

    cp = -(-c // ADAMW8_BLOCK) * ADAMW8_BLOCK
    bind("g", sim.alloc(c * 4, TRANSIENT, "grad.float()", held=False) if es != 4 else None)
    for moment in ("m", "v"):
        bind(moment, _run(sim, [("a", "codes.int()", c * 4), ("a", "code[codes]", c * 4),
                                ("f", "codes.int()"), ("a", "padded", cp * 4), ("f", "code[codes]"),
                                ("a", "moment", cp * 4), ("f", "padded")]) if quantized else None)
    bind("w", sim.alloc(c * 4, TRANSIENT, "param.float()", held=False) if es != 4 else None)
    sim.unref(_run(sim, [("a", "v.sqrt()", c * 4), ("a", "denom", c * 4), ("f", "v.sqrt()")]))
    if quantized:
        nb = cp // ADAMW8_BLOCK
        for _ in ("m", "v"):  # optim8bit._quantize, then its (codes, absmax) copied into the state
            sim.unref(_run(sim, [("a", "blocks", cp * 4), ("a", "abs", cp * 4), ("a", "absmax", nb * 4),
                                 ("f", "abs"), ("a", "absmax > 0", nb), ("a", "reciprocal", nb * 4),
                                 ("a", "1 / absmax", nb * 4), ("f", "reciprocal"), ("a", "zeros", nb * 4),
                                 ("a", "scale", nb * 4), ("f", "absmax > 0"), ("f", "1 / absmax"),
                                 ("f", "zeros"), ("a", "scaled", cp * 4), ("a", "bucketize", cp * 8),
                                 ("f", "scaled"), ("a", "codes", cp), ("f", "bucketize"), ("f", "blocks"),
                                 ("f", "scale"), ("f", "codes")]))


def _run(sim: Sim, events: list[tuple]) -> Any:
    """Allocations ("a", key, bytes) and frees ("f", key) in order; returns the one storage left."""
    held: dict[str, Any] = {}
    for kind, key, *nbytes in events:
        if kind == "a":
            held[key] = sim.alloc(nbytes[0], TRANSIENT, key, held=False)
        else:
            sim.unref(held.pop(key))
    (out,) = held.values()
    return out


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """The chunk sizes a loop over `n` elements in `chunk`s meets, with the repeats that change nothing left
    out: from the second full chunk on, the locals a chunk rebinds already hold that chunk's sizes, so every
    further full chunk allocates and frees the same bytes over the same live set (an 8B model's 8-bit AdamW
    step is ~8,000 chunks; the replay walks 2 per tensor, plus the short last one)."""
    full, rest = divmod(n, chunk)
    return [chunk] * min(full, 2) + ([rest] if rest else [])


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", reads=("beta1", "beta2", "eps"), build=_adamw_build, state=_adamw_state,
              replay=_adamw_replay, host_state=(), amp_scaling=True,
              ops=("aten._fused_adamw_.default", "aten._foreach_add_.Scalar", "aten._foreach_sub_.List",
                   "aten.zeros_like.default", "aten.copy_.default",
                   "aten.select.int", "aten.sub_.Tensor", "aten.view.dtype")),  # these 3: MasterAdamW's
    Optimizer("sgd", reads=("momentum",), build=_sgd_build, state=_sgd_state, replay=_sgd_replay,
              host_state=(), amp_scaling=False,
              ops=("aten._foreach_add.List", "aten._foreach_add_.List", "aten._foreach_mul_.Scalar")),
    Optimizer("adafactor", reads=(), build=_adafactor_build, state=_adafactor_state, replay=_adafactor_replay,
              # its own decay rule and epsilons; its step counters live on the CPU
              host_state=("step",), amp_scaling=False,
              ops=("aten._foreach_add_.List", "aten._foreach_add_.Tensor", "aten._foreach_clamp_min_.Scalar",
                   "aten._foreach_div_.List", "aten._foreach_div_.ScalarList",
                   "aten._foreach_lerp_.ScalarList", "aten._foreach_mul.List", "aten._foreach_mul_.List",
                   "aten._foreach_mul_.Scalar", "aten._foreach_mul_.ScalarList",
                   "aten._foreach_rsqrt_.default", "aten.zeros_like.default")),
    Optimizer("adamw-8bit", reads=("beta1", "beta2", "eps"), build=_adamw_8bit_build, state=_adamw_8bit_state,
              replay=_adamw_8bit_replay, host_state=(), amp_scaling=False,
              ops=("aten.lerp_.Scalar", "aten.addcmul_.default", "aten.addcdiv_.default", "aten.sqrt.default",
                   "aten.abs.default", "aten.gt.Scalar", "aten.bucketize.Tensor", "aten.copy_.default",
                   "aten.zeros_like.default")),
)}


def readers(hyperparameter: str) -> tuple[str, ...]:
    """The optimizers that read `hyperparameter` (a HYPERPARAMETERS key), in registry order."""
    return tuple(name for name, o in OPTIMIZERS.items() if hyperparameter in o.reads)


def hyperparameter_help(hyperparameter: str) -> str:
    """A hyperparameter flag's help: what it is, and the optimizers that read it."""
    names = readers(hyperparameter)
    which = f"--optimizer {names[0]}" if len(names) == 1 else ", ".join(names)
    return f"{HYPERPARAMETERS[hyperparameter]} ({which})."
