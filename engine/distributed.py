"""Applying activation checkpointing, compile and FSDP2 to a finished single-device model (torchtitan style).

The model file knows nothing of any of this: `apply_ac_and_compile` and `parallelize` take the built Llama
and change how its blocks run, keeping parameter names (checkpoints stay Hugging Face format).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.model import meta_model


def apply_ac_and_compile(model: nn.Module, *, activation_checkpointing: bool, compile: bool) -> nn.Module:
    """Per-block activation checkpointing (recompute in backward) and per-block torch.compile, in place.

    Returns the module to call for training (the same model): `checkpoint_wrapper` strips its own prefix from
    state_dict keys and `Module.compile` keeps them, so save/load is unaffected.
    """
    layers = model.model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(layers):
            if not getattr(block, "_fspo_ac", False):
                wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
                wrapped._fspo_ac = True
                layers[i] = wrapped
    if compile:
        for block in layers:
            # Packed rows change length every step: compile for dynamic T once rather than per shape.
            block.compile(dynamic=True)
    return model


def die_with_launcher():
    """Linux: have the kernel kill this worker when its parent (torchrun's agent) dies. Without it a
    kill -9 of the launcher leaves the workers training on, orphaned, into a run directory the user is
    about to --resume."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the run-directory lock still refuses a second job
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def pick_device(device: str | torch.device | None) -> torch.device:
    """The --device a user asked for (default: cuda when available, else cpu), checked to exist here."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FspoError(f"--device {device!r}: not a device (cpu, cuda, cuda:N): {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise FspoError(f"--device {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FspoError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FspoError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device_type: str) -> torch.device:
    """Start the process group for a torchrun launch (NCCL on CUDA, gloo on CPU); return this rank's device."""
    import torch.distributed as dist

    rank, local_rank, world_size = world()
    if world_size > 1:
        die_with_launcher()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def parallelize(model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                mixed_precision: bool = False, device_type: str | None = None) -> nn.Module:
    """FSDP2 (`fully_shard`) over a 1-D mesh of all ranks: each block is a unit, then the root.

    `device_type` is where the shards will live (default: where the parameters are); a model on the meta
    device is sharded without storage and materialised afterwards with `to_empty`.

    Gradients are reduce-scattered as averages over ranks; callers scale their loss so that the average
    equals the global-batch gradient (see `Trainer._train_step`).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept it under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    apply_ac_and_compile(model, activation_checkpointing=activation_checkpointing, compile=compile)
    device_type = device_type or next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def state_dict_name(name: str) -> str:
    """A parameter's name from `named_parameters()` as state dicts and checkpoint files have it: activation
    checkpointing's wrapper adds a level to each block's names."""
    return name.replace("_checkpoint_wrapped_module.", "")


def load_sharded(model_dir, dtype: torch.dtype, device: torch.device, *, attention_impl: str = "auto",
                 activation_checkpointing: bool = False, compile: bool = False,
                 mixed_precision: bool = False) -> nn.Module:
    """`load_model` + `parallelize` for a torchrun job, without any rank ever holding the whole model.

    The model is built and sharded on the meta device, each rank allocates only its FSDP2 shards, and then
    reads just its rows of every tensor from the safetensors files (a sliced read of a memory map). Loading
    the full model first would put a whole copy on every GPU: 32 GB for an 8B model in fp32, all at once,
    before the first shard is cut. The result equals `parallelize(load_model(...))` bit for bit.
    """
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    model, by_file = meta_model(model_dir, attention_impl)
    model = parallelize(model.to(dtype), activation_checkpointing=activation_checkpointing, compile=compile,
                        mixed_precision=mixed_precision, device_type=device.type)
    model.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    params = {state_dict_name(name): p for name, p in model.named_parameters()}  # a tied lm_head: one entry
    with torch.no_grad():
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in names:
                        p = params[name]
                        local = p.to_local() if isinstance(p, DTensor) else p
                        if isinstance(p, DTensor):
                            if tuple(p.placements) != (Shard(0),):
                                raise RuntimeError(f"{name}: expected FSDP2's Shard(0), got {p.placements}")
                            # FSDP2 cuts dim 0 as torch.chunk does: ceil(n / world) rows per rank, the
                            # last ranks shorter or empty.
                            n = p.shape[0]
                            start = min(rank * -(-n // world), n)
                            stop = min(start + -(-n // world), n)
                            if local.shape[0] != stop - start:
                                raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not rank "
                                                   f"{rank}'s torch.chunk of {tuple(p.shape)}")
                            if stop > start:
                                local.copy_(f.get_slice(name)[start:stop].to(dtype))
                        else:
                            local.copy_(f.get_tensor(name).to(dtype))
            except (FspoError, RuntimeError, KeyError):  # ours, not the file's
                raise
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise FspoError(f"{path}: could not read tensors ({exc})") from None
    return model


def local_optimizer_state(osd: dict) -> dict:
    """A sharded optimizer state (`get_optimizer_state_dict`'s, DTensor moments) as this rank's plain CPU
    tensors, plus which entries were sharded: a checkpoint file that loads with weights_only=True."""
    from torch.distributed.tensor import DTensor

    state, sharded = {}, {}
    for fqn, entries in osd["state"].items():
        state[fqn] = {}
        for key, value in entries.items():
            if isinstance(value, DTensor):
                sharded.setdefault(fqn, []).append(key)
                value = value.to_local()
            state[fqn][key] = value.detach().cpu() if torch.is_tensor(value) else value
    return {"state": state, "param_groups": osd["param_groups"], "sharded": sharded}


def sharded_optimizer_state(local: dict, model: nn.Module) -> dict:
    """`local_optimizer_state`'s inverse on the rank that wrote it (same number of ranks): its entries
    as DTensors laid out like the model's parameters, for `set_optimizer_state_dict`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    params = get_model_state_dict(model)  # sharded: DTensors under the optimizer state's names
    state = {fqn: dict(entries) for fqn, entries in local["state"].items()}
    for fqn, keys in local["sharded"].items():
        p = params[fqn]
        for key in keys:
            state[fqn][key] = DTensor.from_local(state[fqn][key].to(p.to_local().device), p.device_mesh,
                                                 p.placements, shape=p.shape, stride=p.stride())
    return {"state": state, "param_groups": local["param_groups"]}


def full_optimizer_state(parts: list[dict]) -> dict:
    """Every rank's `local_optimizer_state`, in rank order, joined into the full (unsharded) state: FSDP2
    shards dim 0 in rank order, so a sharded entry is the concatenation of its parts."""
    first = parts[0]
    state = {fqn: dict(entries) for fqn, entries in first["state"].items()}
    for fqn, keys in first["sharded"].items():
        for key in keys:
            state[fqn][key] = torch.cat([part["state"][fqn][key] for part in parts])
    return {"state": state, "param_groups": first["param_groups"]}


def rank_rows(items: list, pack, rank: int, world: int) -> tuple[list, list]:
    """This rank's share of `items` (every world-th) and its packed rows `pack(share)`, each flagged real;
    padded with repeats flagged not real so that every rank runs the same number of forward (and backward)
    passes: a sharded model's collectives must line up. Every rank packs every share (host work, no
    communication) to find the busiest."""
    share = items[rank::world]
    mine = pack(share)
    if world == 1:
        return share, [(r, True) for r in mine]
    most = max(len(pack(items[r::world])) for r in range(world))  # the same on every rank
    pad = mine[0] if mine else pack(items[:1])[0]  # a rank with no share (fewer items than ranks) pads too
    return share, [(r, True) for r in mine] + [(pad, False)] * (most - len(mine))


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if _active():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few host-side numbers over ranks (metrics); unchanged in a single process."""
    import torch.distributed as dist

    if not _active():
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order; [obj] in a single process."""
    import torch.distributed as dist

    if not _active():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (metrics); unchanged in a single process."""
    return torch.cat(all_gather_objects(t.detach().cpu())).to(t.device)
