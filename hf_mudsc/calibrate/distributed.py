"""Calibration sharded over processes (`torchrun`, `accelerate launch`): local sums, one all-reduce, rank 0 goes on.

The activation statistics are plain sums (Σx, Σxxᵀ, count), so each process accumulates its shard of
the calibration stream and a SUM all-reduce gives every process the statistics of the whole stream.
Solving, saving and publishing then happen on the main process only (see `is_main_process`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_mudsc.calibrate.correlation import CorrelationAccumulator
from hf_mudsc.calibrate.statistics import DEFAULT_STATISTICS_DTYPE, collect_statistics, iter_batches, new_accumulators
from hf_mudsc.errors import CalibrationError
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)


def _process_group() -> Any | None:
    """`torch.distributed` when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def process_info() -> tuple[int, int]:
    """`(rank, world_size)` of this process; `(0, 1)` outside a distributed launch.

    Under `torchrun`/`accelerate launch` (WORLD_SIZE > 1) without a process group yet, accelerate's
    `PartialState` creates one (gloo on CPU, nccl on GPUs) so that callers need no setup code. The answer is then
    read from the group itself: on a machine without CUDA, `PartialState()` (no `cpu=True`, no ACCELERATE_USE_CPU)
    initialises the group yet reports process 0 of 1, which made a process's first call say "single process" on
    every rank (its first merge unsharded and returned on every rank).
    """
    dist = _process_group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        dist = _process_group()
        if dist is not None:
            return dist.get_rank(), dist.get_world_size()
        return state.process_index, state.num_processes
    return 0, 1


def is_distributed() -> bool:
    return process_info()[1] > 1


def is_main_process() -> bool:
    """True on the process that solves, saves and pushes (rank 0, or the only process)."""
    return process_info()[0] == 0


def barrier() -> None:
    """Wait for every process (no-op outside a distributed launch)."""
    dist = _process_group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def _reduce_device() -> torch.device:
    dist = _process_group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A SUM all-reduce of `tensor` across processes (a copy; the identity outside a distributed launch)."""
    dist = _process_group()
    if dist is None or dist.get_world_size() == 1:
        return tensor.clone()
    device = _reduce_device()
    buffer = tensor.detach().to(device=device, copy=True).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def all_reduce_accumulators(accumulators: list[CorrelationAccumulator]) -> list[CorrelationAccumulator]:
    """Sum every accumulator's state over all processes, in place (one all-reduce per tensor, no big copies)."""
    for accumulator in accumulators:
        accumulator.load_tensors([all_reduce_sum(t) for t in accumulator.tensors()])
    return accumulators


def shard_batches(
    calibration: Any,
    rank: int,
    world_size: int,
    *,
    batch_size: int,
    num_samples: int | None,
    columns: Iterable[str] | None,
    required: Iterable[str],
    max_tokens: int | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> tuple[Iterator[dict[str, Any]], int | None]:
    """This process's calibration batches and, when known, how many samples they hold.

    A `CalibrationStream` (what `resolve_calibration` returns for datasets) is split with
    `datasets.distributed.split_dataset_by_node` after its global shuffle and cut; a plain iterable of
    batches is cut to `num_samples` globally and then strided (batch i goes to process i % world_size).
    """
    from hf_mudsc.calibrate.datasets import CalibrationStream

    if isinstance(calibration, CalibrationStream):
        part = calibration.shard(rank, world_size)
        total = part.num_rows
        if total is not None and num_samples is not None:
            total = min(total, num_samples)
        return iter_batches(part, batch_size=batch_size, num_samples=num_samples, columns=columns,
                            required=required, max_tokens=max_tokens, check=check), total
    batches = iter_batches(calibration, batch_size=batch_size, num_samples=num_samples, columns=columns,
                           required=required, max_tokens=max_tokens)
    mine = itertools.islice(batches, rank, None, world_size) if world_size > 1 else batches
    return (mine if check is None else _checked(mine, check)), None


def _checked(batches: Iterable[dict[str, Any]], check: Callable[[Mapping[str, Any]], None]
             ) -> Iterator[dict[str, Any]]:
    """`batches`, each passed to `check` first: only this process's own batches (a batch another process reads is
    that process's to refuse, so the failure is shared as one process's, as a forward's is)."""
    for batch in batches:
        check(batch)
        yield batch


def _share_outcome(failed: bool, check: Any) -> bool:
    """Whether any process failed; the data warnings every process's `check` found are added to this one's.

    A warning (`ModelInputCheck.warnings`: pad ids without a mask, ...) is found in the batches a process reads, and
    the merge's record and card are the main process's: a warning found only in another process's share was lost.
    """
    dist = _process_group()
    own = list(getattr(check, "warnings", None) or [])
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (failed, own))
    warnings = getattr(check, "warnings", None)
    if isinstance(warnings, list):
        for text in (text for _, said in parts for text in said):  # rank order, each once
            if text not in warnings:
                warnings.append(text)
    return any(part_failed for part_failed, _ in parts)


def collect_statistics_distributed(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    calibration: Any,
    *,
    batch_size: int = 32,
    num_samples: int | None = None,
    columns: Iterable[str] | None = None,
    required: Iterable[str] = (),
    progress: bool = True,
    statistics_dtype: str | torch.dtype = DEFAULT_STATISTICS_DTYPE,
    device: torch.device | None = None,
    others: Sequence[nn.Module] = (),
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> list[CorrelationAccumulator]:
    """The statistics of the whole calibration stream, on every process (forwards on `device`).

    One process: `collect_statistics` over all batches. Several: each accumulates its shard, a failure
    anywhere is shared first (so no process waits forever in the all-reduce), then the sums are reduced.
    `check`: called on each batch before its forwards (`statistics.ModelInputCheck`).
    """
    rank, world_size = process_info()
    if world_size == 1:
        batches, total = shard_batches(calibration, 0, 1, batch_size=batch_size, num_samples=num_samples,
                                       columns=columns, required=required, max_tokens=spec.max_tokens, check=check)
        return collect_statistics(model_a, model_b, spec, batches, progress=progress, total=total,
                                  statistics_dtype=statistics_dtype, device=device, others=others)

    error: BaseException | None = None
    accumulators = new_accumulators(spec, statistics_dtype, 2 + len(others))
    try:
        batches, total = shard_batches(calibration, rank, world_size, batch_size=batch_size,
                                       num_samples=num_samples, columns=columns, required=required,
                                       max_tokens=spec.max_tokens, check=check)
        collect_statistics(model_a, model_b, spec, batches, progress=progress and rank == 0,
                           accumulators=accumulators, total=total, allow_empty=True, device=device, others=others)
    except Exception as caught:  # shared with the other processes below, then re-raised here
        error = caught
    failed = _share_outcome(error is not None, check)
    if error is not None:
        raise error
    if failed:
        raise CalibrationError("calibration failed on another process; see that process's error")
    local = accumulators[0].count if accumulators else 0
    all_reduce_accumulators(accumulators)
    global_count = accumulators[0].count if accumulators else 0
    logger.info("process %d/%d: %d of %d calibration samples", rank, world_size, local, global_count)
    if global_count == 0:
        raise CalibrationError("the calibration data has no samples; pass a non-empty dataset or batches")
    return accumulators
