"""Streamed Gram matrices of the inputs of a model's `nn.Linear` layers (padding dropped): RegMean's statistics.

Shared by the refit (docs/design.md §4.9) and the calibration-data same-base methods (`regmean`,
`regmean_plusplus`, docs/design.md §4.11): a forward pre-hook on each layer folds the batch's token rows into a
float64 `Σ xᵀx` at once, so memory is one `(in, in)` matrix per layer whatever the number of samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_mudsc.errors import CalibrationError, MergeInputError
from hf_mudsc.load.objects import whole_sequences
from hf_mudsc.spec import PermutationSpec

# What a forward raises on a batch the model cannot run (a wrong shape, dtype or length): torch's and transformers'
# (an AttributeError: a ViT or CLIP whose config says return_dict=False fails reading its own inner outputs).
FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError)


# Forward arguments that are no model input: a loss's targets (a DataLoader over labelled data yields them; run
# through a classifier they compute a loss nobody reads, and fail on labels outside its classes) and `**kwargs`.
NOT_MODEL_INPUTS = frozenset({"labels", "label", "return_loss"})


def _names_inputs(parameters: list[inspect.Parameter]) -> bool:
    """Whether a forward's parameters name a model input (not only `*args`, `**kwargs` and `NOT_MODEL_INPUTS`)."""
    return any(p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
               and p.name not in NOT_MODEL_INPUTS for p in parameters)


def forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of the model's forward, read from the nearest forward that names its inputs: a user's wrapper
    of the stock forward — a subclass's `forward(self, *args, labels=None, **kwargs)`, or a function set on the
    instance — hides the input names the stock forward it calls reads, and that signature is what the call reaches."""
    own = list(inspect.signature(model.forward).parameters.values())
    if _names_inputs(own):
        return own
    bound = getattr(model.forward, "__func__", None)
    replaced = bound is not type(model).__dict__.get("forward", bound)  # a forward set on the instance
    for cls in type(model).__mro__[0 if replaced else 1:]:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        named = list(inspect.signature(forward).parameters.values())[1:]  # without self
        if _names_inputs(named):
            return named
    return own


def model_input_names(model: nn.Module, parameters: list[inspect.Parameter] | None = None) -> set[str]:
    """The names of the model's forward arguments that are model inputs (not `NOT_MODEL_INPUTS`, not `**kwargs`);
    `parameters`: its `forward_parameters`, when the caller has them already."""
    parameters = forward_parameters(model) if parameters is None else parameters
    return {parameter.name for parameter in parameters if parameter.name not in NOT_MODEL_INPUTS
            and parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def forward_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch entries the model's forward reads as inputs (`model_input_names`), and `return_dict=True` where
    the forward takes it: a config saved with `return_dict=False` (for torch.jit / ONNX export) makes it return a
    tuple, and every pass reads its outputs by name."""
    parameters = forward_parameters(model)  # once per batch: a signature read, and for a wrapper its MRO walked
    accepted = model_input_names(model, parameters)
    inputs = {k: v for k, v in batch.items() if k in accepted}
    if any(p.name == "return_dict" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        inputs["return_dict"] = True
    return inputs


def unrunnable_batch(model: nn.Module, batch: Mapping[str, Any], error: BaseException) -> CalibrationError:
    """The one-line error for a calibration batch `model` cannot run: every pass over the data (statistics, regmean,
    fisher, the refit, REPAIR, the held-out scores) names the model class and the batch's columns alike, instead of
    the raw exception from deep inside the forward, which names neither."""
    if isinstance(error, AttributeError) and getattr(getattr(model, "config", None), "return_dict", True) is False:
        return CalibrationError(f"{type(model).__name__} cannot run with its config's return_dict=False ({error}); "
                                "set model.config.return_dict = True, or remove \"return_dict\": false from its "
                                "config.json")
    return CalibrationError(f"a calibration batch could not be run through {type(model).__name__} "
                            f"(columns {sorted(batch)}): {error}")


def run_forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """`model(**forward_inputs(model, batch))`, a batch the model cannot run refused by `unrunnable_batch`. Errors
    hf_mudsc raises on purpose (a hook's `CalibrationError` or `MergeInputError`, `StopForward`) pass through."""
    try:
        return model(**forward_inputs(model, batch))
    except (CalibrationError, MergeInputError):
        raise
    except FORWARD_ERRORS as error:
        raise unrunnable_batch(model, batch, error) from error


class StopForward(Exception):
    """Raised by a hook once everything a pass needs has run: the rest of the forward is skipped."""


def padding_mask_key(spec: PermutationSpec, weight: str) -> str | None:
    """The batch key of the padding mask the spec declares for the groups this layer's weight belongs to."""
    for index, _ in spec.axes_of(weight):
        for hook in spec.groups[index].hooks:
            if hook.mask:
                return hook.mask
    return None


def norm_mask_key(spec: PermutationSpec, weight: str) -> str | None:
    """A LayerNorm's padding mask: its own groups' (`padding_mask_key`), else the mask of a group that shares a
    tensor with its group — the blocks that read the same residual stream (a residual group is often read at an
    unmasked [CLS] hook, e.g. BERT's pooler input, while its blocks' groups declare the mask; without this the
    norm's statistics would count padding tokens). One tower's stream shares tensors only with its own blocks, so
    a vision tower never takes a text tower's mask."""
    own_key = padding_mask_key(spec, weight)
    if own_key is not None:
        return own_key
    own = {index for index, _ in spec.axes_of(weight)}
    params = {member.param for index in own for member in spec.groups[index].members}
    for index, group in enumerate(spec.groups):
        if index not in own and any(member.param in params for member in group.members):
            for hook in group.hooks:
                if hook.mask:
                    return hook.mask
    return None


def token_rows(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`(..., d)` -> `(samples, d)`: every token / image is one row, padding positions (mask 0) dropped."""
    if mask is not None and features.dim() == 3 and tuple(mask.shape) == tuple(features.shape[:2]):
        return features[mask.to(device=features.device, dtype=torch.bool)]
    return features.reshape(-1, features.shape[-1])


def batch_to(batch: Mapping[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    """The batch with its tensors on `device` (unchanged for None)."""
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def first_inputs(model: nn.Module, layers: Sequence[str], batch: Mapping[str, Any]
                 ) -> list[tuple[str, torch.Tensor]]:
    """`layers` in the order their forwards first run on `batch`, each with the first tensor it was fed (layers
    that never run are left out): the forward order the refit and RegMean++ walk."""
    modules = dict(model.named_modules())
    fired: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in seen and args:
                seen.add(name)
                fired.append((name, args[0]))
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad(), whole_sequences([model]):
            run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return fired


def linear_layers(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """The names of the model's `nn.Linear` modules, in module order, minus `exclude`."""
    skip = set(exclude)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in skip]


class GramAccumulator:
    """`Σ xᵀx` over the token rows a layer received, in float64, and how many rows: flat in the number of samples."""

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.rows = 0

    def update(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum.addmm_(x.T, x)
        self.rows += len(x)

    def mean(self) -> torch.Tensor:
        """`Σ xᵀx / rows` (RegMean's Gram as FusionBench scales it); zeros when the layer never ran."""
        return self.sum / self.rows if self.rows else self.sum.clone()


def collect_grams(
    model: nn.Module,
    layers: Sequence[str],
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    *,
    mask_keys: Mapping[str, str | None] | None = None,
    stop_after: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, GramAccumulator], int]:
    """One pass over `batches()`: the Gram of each named Linear layer's inputs (every call of the layer counts).

    Args:
        model: run in its current mode under `torch.no_grad` (callers put it in eval mode and on `device`).
        layers: names of `nn.Linear` modules of `model`.
        mask_keys: layer -> batch key of its padding mask (`padding_mask_key`); rows where it is 0 are dropped.
        stop_after: a module whose output ends the pass for this batch (the rest of the forward is not needed).
    Returns:
        ({layer: GramAccumulator}, number of examples read).
    """
    modules = dict(model.named_modules())
    grams = {name: GramAccumulator(modules[name].in_features, device) for name in layers}
    keys = mask_keys or {}
    current: dict[str, Any] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                key = keys.get(name)
                grams[name].update(token_rows(args[0], current.get(key) if key else None))
        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise StopForward

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in layers]
    if stop_after is not None:
        handles.append(modules[stop_after].register_forward_hook(stop))
    examples = 0
    try:
        with torch.no_grad(), whole_sequences([model]):
            for batch in batches():
                batch = batch_to(batch, device)
                current.clear()
                current.update(batch)
                examples += next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 0)
                try:
                    run_forward(model, batch)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return grams, examples
