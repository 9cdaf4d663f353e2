"""Scale-out under torchrun: process groups, DDP or FSDP2 wrapping, full checkpoints, `--devices`.

    torchrun --nproc-per-node 2 -m microft pretrain --data corpus/ --micro-bs 4 --accum 2
    microft pretrain --data corpus/ --devices 2            # the same: relaunches itself under torchrun

Every rank builds the same model, then `setup_distributed` wraps it: DDP by default, or FSDP2
(`fully_shard` on each block, then the root) with `--shard fsdp`. Every rank sees the same
deterministic global batch and trains on its share of the micro-batches (`train.loop.step_batches`).
Only rank 0 logs and writes files; checkpoints always hold full, unsharded tensors in the
single-device format, so a run saved by 4 ranks loads and resumes on one.
Outside torchrun everything here is a no-op on a `Dist()` of rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from microft.config import RunConfig
from microft.errors import CheckpointError, ConfigError
from microft.models.load import load_state_into
from microft.train.step import place_model, resolve_precision

Event = dict[str, Any]


@dataclass
class Dist:
    """Distributed context: rank 0 of 1 unless launched under torchrun."""

    rank: int = 0
    world_size: int = 1
    wrapped: Any = None  # the DDP-wrapped or FSDP2-sharded module, when distributed
    local_rank: int = 0
    device: torch.device | None = None  # this rank's device; None: resolve from the config
    shard: str = "none"  # "ddp" or "fsdp" when distributed
    owns_group: bool = False  # setup_distributed created the process group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.shard == "fsdp"


# --- launching --------------------------------------------------------------------------------
def strip_devices(argv: list[str]) -> list[str]:
    """`argv` without `--devices N` / `--devices=N` (the children must not relaunch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--devices":
            skip = True
        elif not a.startswith("--devices="):
            out.append(a)
    return out


def launch(n: int, argv: list[str]) -> int:
    """Run `microft <argv>` as `n` processes under torchrun on this machine; return its exit code."""
    if n < 1:
        raise ConfigError(f"--devices must be at least 1, got {n}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "microft", *strip_devices(argv)]
    env = dict(os.environ)
    # torchrun would pin every process to 1 thread (with a warning); share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.Popen(cmd, env=env)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            return 130 if interrupted and code else code
        # torchrun forwards it to the ranks: wait while they finish the step and save
        except KeyboardInterrupt:
            interrupted = True


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


# --- setup and teardown ---------------------------------------------------------------------
def rank_device(cfg: RunConfig, local_rank: int) -> torch.device:
    """CUDA device `local_rank` unless the run is on CPU (explicitly, or no GPU with `auto`)."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not cfg.device.startswith("cuda") and cfg.device != "auto":
        raise ConfigError(f"multi-device runs support --device cpu or cuda, not {cfg.device!r}")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda given but no CUDA GPU is available")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                          f"use --devices {torch.cuda.device_count()} or --device cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(cfg: RunConfig, model: torch.nn.Module) -> Dist:
    """Join the torchrun process group and wrap `model` (DDP, or FSDP2 with `--shard fsdp`).

    Outside torchrun (or with one process) returns `Dist()` and leaves the model alone.
    The model is moved to this rank's device (and cast for bf16-true) before wrapping.
    """
    env = torchrun_env()
    if env is None or env[1] <= 1:
        return Dist()
    rank, world, local_rank = env
    device = rank_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not torch.distributed.is_initialized()  # a caller's own group is reused, and kept
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    place_model(model, resolve_precision(cfg.precision, device), device)
    shard = "fsdp" if cfg.shard == "fsdp" else "ddp"
    if shard == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # FSDP keeps each rank's own init: make them rank 0's
            for t in model.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        mesh = init_device_mesh(device.type, (world,))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights at construction; gradients live in its buckets (no second copy)
        wrapped = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True)
    return Dist(rank=rank, world_size=world, wrapped=wrapped, local_rank=local_rank, device=device,
                shard=shard, owns_group=owns_group)


def teardown(dist: Dist) -> None:
    """Leave the process group if `setup_distributed` joined it (a no-op outside torchrun)."""
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(cfg: RunConfig, model: torch.nn.Module) -> Iterator[Dist]:
    """`with distributed(cfg, model) as dist:` — setup_distributed, then teardown however it ends."""
    dist = setup_distributed(cfg, model)
    try:
        yield dist
        if dist.world_size > 1:
            torch.distributed.barrier()  # no rank returns before rank 0 has written the run's files
    finally:
        teardown(dist)


def main_only(on_event: Callable[[Event], None], dist: Dist) -> Callable[[Event], None]:
    """The event sink on rank 0; a no-op on the other ranks."""
    return on_event if dist.is_main else (lambda e: None)


# --- inside the step --------------------------------------------------------------------------
@contextlib.contextmanager
def grad_sync(dist: Dist, enabled: bool) -> Iterator[None]:
    """Around a micro-step: with `enabled` False, gradients stay local (no all-reduce/reduce-scatter)."""
    mod = dist.wrapped
    if enabled or mod is None:
        yield
    elif dist.fsdp:  # FSDP2 has no no_sync(): it keeps unsharded gradients until a syncing backward
        mod.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            mod.set_requires_gradient_sync(True)
    else:
        with mod.no_sync():
            yield


def reduce_step(loss_sum: torch.Tensor, stop: bool, dist: Dist) -> tuple[torch.Tensor, bool]:
    """Sum the step loss over ranks and learn whether any rank was signalled, in one all-reduce.

    Every rank must agree to stop at the same step, or the others would wait in a collective.
    """
    if dist.world_size <= 1:
        return loss_sum, stop
    both = torch.stack([loss_sum.float(), torch.tensor(float(stop), device=loss_sum.device)])
    torch.distributed.all_reduce(both)
    return both[0], bool(both[1] > 0)


def rank0_float(value: float, dist: Dist) -> float:
    """Rank 0's value on every rank, so decisions that lead to collectives (best, early stop) agree."""
    if dist.world_size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist.device)
    torch.distributed.broadcast(t, src=0)
    return float(t)


# --- full checkpoints -----------------------------------------------------------------------------
def full_model_state(model: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """The model's full state dict (its own key names) on rank 0; every rank must call it.

    Under FSDP this gathers the shards to rank 0's CPU (other ranks get {}); otherwise it
    is `model.state_dict()`.
    """
    if not dist.fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of `optimizer.state_dict()` is name i."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """`optimizer.state_dict()` with full tensors on rank 0, in the single-device layout.

    Under FSDP every rank must call it; the gathered (name-keyed) state is re-keyed by index.
    """
    if not dist.fsdp or not optimizer.state:  # an unstepped optimizer has nothing sharded
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return {}
    index = {n: i for i, n in enumerate(_param_order(model, optimizer))}
    local = optimizer.state_dict()  # its param_groups are the same on every rank, already index-keyed
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": local["param_groups"]}


def load_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     dist: Dist) -> None:
    """Load a single-device-layout optimizer state; under FSDP each rank keeps its shard of it."""
    if not dist.fsdp or not state["state"]:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _param_order(model, optimizer)
    named = {"state": {order[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                              for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    # exact types (betas)
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], dist: Dist, source: str) -> None:
    """Copy full microft-named weights (unpadded vocabulary) into `model`, sharded under FSDP."""
    if not dist.fsdp:
        load_state_into(model, state, source)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {}
    for k, dst in model.state_dict().items():  # DTensors report their full shape
        name = k
        if name not in state:
            raise CheckpointError(f"{source} does not match the model: missing {name}")
        src = state[name]
        if name == "wte.weight" and src.shape[0] < dst.shape[0]:  # re-pad the vocabulary
            src = torch.cat([src, src.new_zeros(dst.shape[0] - src.shape[0], src.shape[1])])
        if src.shape != dst.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(src.shape)}, model expects "
                                  f"{tuple(dst.shape)}")
        full[k] = src.to(dst.dtype)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
