"""Which device runs the calibration forwards and statistics products (`device=` / `--device`)."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None, *, cli: bool = False) -> torch.device:
    """The device that runs the calibration forwards and statistics GEMMs; bad values fail before any work.

    None means CUDA when `torch.cuda.is_available()`, else the CPU. An unindexed CUDA device (None or
    `"cuda"`) is `cuda:$LOCAL_RANK` under `torchrun`/`accelerate launch` (one GPU per process) and torch's
    current CUDA device otherwise. `cli=True` words the errors with the `--device` flag.
    """
    shown = f"--device {device}" if cli else f"device {str(device)!r}"
    choices = "use 'cpu', 'cuda' or 'cuda:N'"
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        parsed = torch.device("cuda")
    elif isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown {shown}; {choices}") from None
    else:
        raise ValueError(f"device must be a string like 'cpu' or 'cuda:0' or a torch.device, got {device!r}")
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type != "cuda":
        raise ValueError(f"unsupported {shown}; {choices}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{shown}: CUDA is not available on this machine; " + ("use --device cpu" if cli else "pass device='cpu'")
        )
    count = torch.cuda.device_count()
    if parsed.index is None:
        local_rank = os.environ.get("LOCAL_RANK", "")
        return torch.device("cuda", int(local_rank) % count) if local_rank.isdigit() else parsed
    if parsed.index >= count:
        raise ValueError(f"{shown}: there is no CUDA device {parsed.index} ({count} available: 0-{count - 1})")
    return parsed
