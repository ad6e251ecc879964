"""Models larger than one GPU: FSDP2 sharding, and what the loop and checkpoints need to know about it.

``shard`` applies PyTorch's own engine (``torch.distributed.fsdp.fully_shard``) the way torchtitan does: optional
activation checkpointing, ``fully_shard`` on each transformer block, then on the root, with a
``MixedPrecisionPolicy`` (parameters in the given dtype, gradient reductions in fp32) on a 1-D device mesh. Call it
before building the optimizer. Besides ``dist.py``, this is the one module that calls ``torch.distributed``: the
loop asks it whether a model is sharded, and checkpoints move model and optimizer state through it (one state-dict
API for plain, DDP and sharded models; torch Distributed Checkpoint for sharded files).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_loop.dist import DistEnv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model sharded with FSDP2 (an ``FSDPModule``, or any DTensor parameter)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps it for a subclass named ``FSDP<Class>``."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return type(model)
    return next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))


def param_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The compute dtype of a sharded model's ``MixedPrecisionPolicy`` (None: none, or not sharded)."""
    get_state = getattr(model, "_get_fsdp_state", None)
    policy = getattr(get_state(), "_mp_policy", None) if callable(get_state) else None
    return getattr(policy, "param_dtype", None)


def _blocks(model: torch.nn.Module, blocks: Sequence[type | str] | None) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or []) if blocks is None else set()
    classes = tuple(b for b in blocks or () if isinstance(b, type))
    names |= {b for b in blocks or () if isinstance(b, str)}
    found = [
        m for m in model.modules() if m is not model and (type(m).__name__ in names or isinstance(m, classes))
    ]
    if not found:
        wanted = (
            sorted(names) + [c.__name__ for c in classes] or "_no_split_modules, which it does not declare"
        )
        raise ValueError(
            f"hl.shard found no transformer block to shard in {type(model).__name__} (looked for {wanted}); pass "
            "blocks=[TheBlockClass] (e.g. its decoder layer class)"
        )
    return found


def _checkpoint_activations(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Non-reentrant activation checkpointing of each block (recomputed in backward); returns the wrappers,
    which are what gets sharded (as torchtitan does). State-dict keys stay the block's own."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    wanted, wrapped = {id(b) for b in blocks}, []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                wrapped.append(checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                setattr(parent, name, wrapped[-1])
    return wrapped


def shard(
    model: torch.nn.Module,
    env: DistEnv,
    *,
    precision: str = "bf16",
    activation_checkpointing: bool = False,
    blocks: Sequence[type | str] | None = None,
) -> torch.nn.Module:
    """Shard ``model`` over the ranks of ``env`` with FSDP2, in place; call it before building the optimizer.

    Each transformer block (the classes in ``model._no_split_modules``, or ``blocks``) becomes one FSDP unit, then
    the root takes the rest. Parameters, gradients and optimizer state are split over the ranks (about 1/W each);
    each block's full parameters exist only while it runs. On one process the model is returned as it is.

    Args:
        precision: the compute dtype of parameters ("bf16", "fp16" or "fp32"); gradients are reduced in fp32
            and the optimizer keeps fp32 master weights. With "bf16"/"fp16", ``hl.train`` uses no autocast.
        activation_checkpointing: recompute each block's activations in backward (non-reentrant): less memory,
            about a third more compute.
        blocks: the block classes (or class names) to shard one by one.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> env = hl.init_distributed()                 # under torchrun: this rank of the job
        >>> model = hl.shard(AutoModelForCausalLM.from_pretrained("org/model"), env, precision="bf16")
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)    # after shard, never before
        >>> env.world_size, type(model).__name__      # one process: the model as it was
        (1, 'LlamaForCausalLM')
    """
    if precision not in DTYPES:
        raise ValueError(f"hl.shard precision must be one of {sorted(DTYPES)}, got {precision!r}")
    found = _blocks(model, blocks)
    if activation_checkpointing:
        found = _checkpoint_activations(model, found)
    if not env.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    dtype = DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    model.to(env.device)
    for block in found:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose parameters are not the model's current ones (built before ``hl.shard``).

    Raises:
        ValueError: naming how many optimizer parameters are orphaned, and the fix.
    """
    current = {id(p) for p in model.parameters()}
    orphans = sum(id(p) not in current for group in optimizer.param_groups for p in group["params"])
    if orphans:
        raise ValueError(
            f"{orphans} of the optimizer's parameters are not this model's parameters: the optimizer was built "
            "before hl.shard (or fully_shard) replaced them, so it would update orphaned copies and training would "
            "silently do nothing. Build the optimizer after sharding: model = hl.shard(model, env); "
            "optimizer = torch.optim.AdamW(model.parameters(), ...)"
        )


def full_value(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's global value (e.g. a gradient norm computed over shards); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip (or do) the gradient reduce-scatter of the next backward: FSDP's ``no_sync`` for accumulation."""
    model.set_requires_gradient_sync(enabled)


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, full: bool) -> tuple[dict, dict]:
    """Model and optimizer state keyed by parameter names (one format for plain, DDP and sharded models).

    ``full=False`` keeps a sharded model's local shards (for Distributed Checkpoint); ``full=True`` gathers full
    tensors (a collective on every rank for a sharded model).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full))


def load_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: Mapping, optim_state: Mapping | None,
    *, full: bool,
) -> None:  # fmt: skip
    """Load what :func:`state_dicts` gave, into a plain, DDP or sharded model (a full state is split here)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full)
    set_model_state_dict(model, dict(model_state), options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, dict(optim_state), options=options)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU, gathered from every rank's shards (a collective on every rank of
    a sharded model); rank 0 holds the values, the other ranks an empty dict. A plain model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(state: dict[str, Any], folder: Path) -> None:
    """Every rank writes its shards of ``state`` with torch Distributed Checkpoint (one file per rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def save_sharded_async(state: dict[str, Any], folder: Path, group: Any) -> Any:
    """Like :func:`save_sharded`, in the background: DCP copies ``state`` to CPU memory first (training may
    change the tensors meanwhile), then writes on a thread, coordinating over ``group`` (a gloo group of its
    own, so its collectives never interleave with training's). Returns a future; ``.result()`` waits."""
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(state, checkpoint_id=str(folder), process_group=group)


def background_group() -> Any:
    """A new gloo process group for background checkpoint writes (a collective: every rank calls it)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def load_sharded(state: dict[str, Any], folder: Path) -> None:
    """Fill ``state`` (a template of the right shapes and shards) in place from a Distributed Checkpoint; it
    reshards whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # loading a sharded checkpoint into one process is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(folder))


def sharded_files(folder: Path, rank: int) -> list[Path]:
    """The files rank ``rank`` wrote into a Distributed Checkpoint: its ``__{rank}_*.distcp`` shards, and for
    rank 0 also ``.metadata`` (torch's FileSystemWriter naming)."""
    mine = sorted(Path(folder).glob(f"__{rank}_*.distcp"))
    return mine + ([Path(folder) / ".metadata"] if rank == 0 else [])
