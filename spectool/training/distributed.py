"""Training on several processes: ``torchrun --nproc-per-node N -m spectool train ...``.

* Every process builds the same global batch (same data, same seed) and takes its own disjoint slice of the rows
  (`shard_batch`), so a run's data does not depend on the number of processes.
* The draft is replicated with `DistributedDataParallel` (gloo on CPU, nccl on CUDA), or sharded with FSDP2's
  ``fully_shard`` (``--fsdp``) when it is too big to replicate. Either way the module handed to DDP / FSDP is the
  draft together with its objective (`DraftWithObjective`): the objectives call draft methods other than
  ``forward`` (``ttt_forward``, ``run_backbone``...), and DDP arms its gradient hooks, like FSDP its parameter
  gathering, only inside the wrapped module's ``forward``.
* Rank 0 logs and writes checkpoints; the others wait at a barrier around every save.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here starts a process group and the helpers are no-ops.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spectool.errors import SpectoolError, UsageError
from spectool.hardware import auto_device
from spectool.training.batches import Batch

#: How long a process waits for the others at a collective before giving up (a crashed peer otherwise hangs it).
TIMEOUT = timedelta(minutes=30)


@dataclass
class DistributedContext:
    """This process's place in the run: rank, world size, its device, and the process group backend (or None)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all processes (in place; float64 keeps the token counts exact)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide_on_main(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 and share its result, or its `SpectoolError`, with every process."""
        outcome: tuple[Any, BaseException | None] = (None, None)
        if self.is_main:
            try:
                outcome = (action(), None)
            except SpectoolError as exc:
                outcome = (None, exc)
        result, error = self.broadcast_object(outcome)
        if error is not None:
            raise error
        return result

    def sum_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over all processes (one all-reduce); the keys must be the same everywhere."""
        if not self.enabled:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        self.all_reduce_sum(tensor)
        return dict(zip(keys, tensor.tolist(), strict=True))

    def rows(self, global_rows: int) -> slice:
        """This process's contiguous slice of a global batch of ``global_rows`` rows (a multiple of the world)."""
        per = global_rows // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def launched_as_main() -> bool:
    """Whether this process is the main one of its launch: torchrun's rank 0, or a process torchrun did not start
    (readable before the process group is joined, and after it is left)."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), or return a single-process context. CUDA processes use ``cuda:LOCAL_RANK`` and nccl;
    CPU processes use gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = auto_device(device)
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {chosen} was asked for, but CUDA is not available (use --device cpu)")
    if world_size <= 1:
        return DistributedContext(device=torch.device(chosen))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        target, backend = torch.device("cuda", local_rank), "nccl"
    else:
        target, backend = torch.device(chosen), "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise SpectoolError(f"cannot join the torchrun process group ({backend}): {exc}") from None
    return DistributedContext(rank, world_size, local_rank, target, backend)


def shutdown(context: DistributedContext, *, clean: bool = True, release: Any = None) -> None:
    """Leave the process group.

    ``clean``: every process got here (after the same collectives). They meet at a barrier, then wait a moment
    with the GIL released: gloo's worker threads free finished work objects, which can need the GIL, and a
    process-group destructor waiting for them while holding it deadlocks. ``release`` (e.g. drops the DDP wrapper,
    whose reducer holds the group) runs in between. After a failure the group is left to process exit, because
    the other processes may be inside a collective that would never finish.
    """
    if not (context.enabled and dist.is_initialized()):
        return
    if not clean:
        return
    dist.barrier()
    time.sleep(0.2)
    if release is not None:
        release()
        gc.collect()
        time.sleep(0.05)
    dist.destroy_process_group()


def shard_batch(batch: Batch, context: DistributedContext) -> Batch:
    """This process's rows of a global batch.

    A batch whose rows do not divide evenly (the last of an epoch) is first padded with copies of its first row
    whose loss mask is zero: they cost a little compute and teach nothing, and every process keeps running the
    same number of forwards (which DDP and FSDP collectives need).
    """
    if not context.enabled:
        return batch
    rows = batch.input_ids.shape[0]
    missing = -rows % context.world_size
    if missing:
        batch = _pad_rows(batch, missing)
    chosen = context.rows(rows + missing)
    return Batch(
        batch.input_ids[chosen],
        batch.attention_mask[chosen],
        batch.loss_mask[chosen],
        batch.position_ids[chosen],
        batch.document_ids[chosen],
    )


def _pad_rows(batch: Batch, count: int) -> Batch:
    def extend(tensor: torch.Tensor, zero: bool = False) -> torch.Tensor:
        copies = tensor[:1].expand(count, -1)
        return torch.cat((tensor, torch.zeros_like(copies) if zero else copies))

    return Batch(
        extend(batch.input_ids),
        extend(batch.attention_mask),
        extend(batch.loss_mask, zero=True),
        extend(batch.position_ids),
        extend(batch.document_ids),
    )


class DraftWithObjective(nn.Module):
    """The draft and its objective as one module whose ``forward`` returns the loss (what DDP / FSDP wrap).

    The full `ObjectiveOutput` of the last call is kept in ``last_output`` (metrics, supervised count).
    """

    def __init__(self, draft: nn.Module, objective: Any) -> None:
        super().__init__()
        self.draft = draft
        self.objective = objective
        self.last_output: Any = None

    def forward(self, target_batch: Any, **kwargs: Any) -> torch.Tensor:
        self.last_output = self.objective(target_batch, **kwargs)
        return self.last_output.loss


def wrap_model(module: DraftWithObjective, context: DistributedContext, *, fsdp: bool) -> nn.Module:
    """``module`` itself (one process), in DDP (several), or sharded with FSDP2 ``fully_shard`` (``fsdp``).

    FSDP shards each decoder layer the draft calls as a module (``draft.layers``) plus the rest at the root;
    EAGLE-3's single layer is reached through its methods, so it stays in the root group.
    """
    if fsdp:
        if not context.enabled:
            raise UsageError("--fsdp shards the draft over processes: start the run with torchrun --nproc-per-node N")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise SpectoolError(
                f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard); torch {torch.__version__}"
            ) from None
        try:
            for layer in getattr(module.draft, "layers", None) or []:
                fully_shard(layer)
            fully_shard(module)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise SpectoolError(
                f"FSDP2 cannot shard the draft on {context.device.type} with {context.backend}: "
                f"{str(exc).splitlines()[0]}; train with DDP (drop --fsdp)"
            ) from None
        return module
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the module lives on one device and the inputs are already there. Every trainable parameter
    # of every draft is in every loss's graph (an empty slice still connects it, with a zero gradient).
    return DistributedDataParallel(module, device_ids=None)


def shard_frozen_target(model: nn.Module, context: DistributedContext) -> tuple[int, int]:
    """Shard the frozen target's decoder layers over the processes with FSDP2 ``fully_shard`` (each keeps 1/N of
    every layer and gathers a layer for its forward); the embedding, the final norm and the lm_head stay whole
    on every process (the objectives and the draft's copies read them directly). Every process must then run
    the target's forward the same number of times, which the trainer's lockstep batches do. Returns (bytes of the
    target this process keeps, bytes of the whole target)."""
    from spectool.target import find_decoder

    if not context.enabled:
        raise UsageError(
            "--shard-target shards the target over processes: start the run with torchrun --nproc-per-node N"
        )
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    if context.device.type == "cpu":
        return_freed_memory()
    try:
        from torch.distributed.fsdp import fully_shard

        for layer in find_decoder(model).layers:
            # each layer is its own FSDP root (the model is not sharded), and a root left to choose keeps its
            # gathered weights after the forward (for the backward a trained model runs next): all layers would
            # end up gathered
            fully_shard(layer, reshard_after_forward=True)
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as exc:
        raise SpectoolError(
            f"FSDP2 cannot shard the target on {context.device.type} with {context.backend}: "
            f"{str(exc).splitlines()[0]}; train without --shard-target"
        ) from None
    kept = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    return kept, whole


#: glibc's mallopt parameter for the size above which allocations are their own memory mappings.
_M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once. Its default raises the mapping threshold
    as blocks are freed, so the layers a sharded target gathers and frees one by one stay in the process's
    resident memory: measured with 2 gloo processes, each kept the whole target's size after one forward, against
    its 1/2 share with this set. No effect off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except OSError:
        pass


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def unwrap(model: nn.Module) -> DraftWithObjective:
    """The `DraftWithObjective` inside a DDP wrapper (FSDP2 modifies the module in place)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, DraftWithObjective)
    return inner


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-batches before the last of an accumulation."""
    if enabled:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def trainable_weights_finite(model: nn.Module, context: DistributedContext) -> bool:
    """Whether every trainable weight is finite on every process (each checks its own shards under FSDP)."""
    broken = 0.0
    for param in model.parameters():
        if param.requires_grad:
            if not bool(torch.isfinite(_local(param).detach()).all()):
                broken = 1.0
                break
    return not context.sum_over_processes({"broken": broken})["broken"]


def exportable_draft(model: nn.Module, draft: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The draft to save: under FSDP (each process holds only shards) a CPU replica holding ``state``, the
    `full_model_state` every process gathered; else ``draft`` itself."""
    if not is_fsdp(model):
        return draft
    replica = type(draft)(draft.config)
    replica.load_state_dict(state, strict=True)
    return replica


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The draft's complete state dict on CPU (a collective under FSDP: every process must call it)."""
    inner = unwrap(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(inner, options=options)
        return {key.removeprefix("draft."): value for key, value in state.items() if key.startswith("draft.")}
    return {key: value.detach().cpu() for key, value in inner.draft.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's complete state (a collective under FSDP: every process must call it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"format": "fsdp-full", "state": get_optimizer_state_dict(unwrap(model), optimizer, options=options)}
    return {"format": "torch", "state": optimizer.state_dict()}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    expected = "fsdp-full" if is_fsdp(model) else "torch"
    if saved.get("format") != expected:
        mode = "with --fsdp" if saved.get("format") == "fsdp-full" else "without --fsdp"
        raise UsageError(f"this checkpoint was written {mode}; resume it the same way")
    if expected == "fsdp-full":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=saved["state"], options=options)
    else:
        optimizer.load_state_dict(saved["state"])
