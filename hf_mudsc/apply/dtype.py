"""The merged model's dtype (`out_dtype`): the parents' own, as a Hugging Face user expects, or the one asked for.

The merge computes in float32 (the parents are loaded so, `hf_mudsc.load.parents`); the merged model is cast once,
at the end, and its config's `dtype` set to match, so `save_pretrained` writes that dtype and
`from_pretrained(dtype="auto")` restores it. Two float16 parents give a float16 model, not a float32 one twice the
size on disk (mergekit's `out_dtype` does the same)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from hf_mudsc.errors import MergeInputError, option_hint

logger = logging.getLogger(__name__)

#: The stored dtypes `out_dtype="auto"` keeps when every parent has it; any other (a mix within a checkpoint,
#: float8) gives float32.
KEPT = ("float16", "bfloat16", "float32", "float64")
FALLBACK = "float32"


def resolve_out_dtype(asked: str, stored: Sequence[str | None], labels: Sequence[str],
                      loaded: Sequence[bool] = ()) -> tuple[str, str]:
    """(dtype name, why) of the merged model: `asked` unless it is "auto"; then the dtype every parent is stored in
    (`stored`, one per parent: `LoadedParent.stored_dtype`, None when unknown = float32), float32 when they differ
    (it holds the values of any of them). `labels` name the parents in the reason (A, B, ...). `loaded`: which
    parents were given as model objects, whose dtype is the one they were loaded as, not their files' (the reason
    says "loaded as": an object loaded with dtype=float16 from float32 files is not stored in float16)."""
    if asked != "auto":
        return asked, f"asked for with {option_hint('out_dtype')}"
    found = [name or FALLBACK for name in stored]
    objects = [bool(flag) for flag in loaded] + [False] * (len(found) - len(loaded))
    verb = "loaded as" if all(objects) else "stored in or loaded as" if any(objects) else "stored in"
    if len(set(found)) == 1 and found[0] in KEPT:
        return found[0], f"auto: every parent is {verb} {found[0]}"
    each = ", ".join(f"{label} {name}{' (loaded as)' if is_object and not all(objects) else ''}"
                     for label, name, is_object in zip(labels, found, objects))
    if len(set(found)) == 1:
        return FALLBACK, f"auto: the parents are {verb} {found[0]} ({each}), kept as {FALLBACK}"
    return FALLBACK, (f"auto: the parents are {verb} different dtypes ({each}), so {FALLBACK}, which holds them "
                      "all")


def cast_merged(model: PreTrainedModel, name: str, reason: str, *, asked: bool) -> tuple[str, str]:
    """Cast the merged `model` (float32, changed in place) to dtype `name` and set its config's `dtype` (and its
    sub-configs', as `from_pretrained` does) to match; returns the (dtype, reason) it ends in.

    A value beyond the dtype's range would become inf: an `asked` dtype is then refused in one line naming the
    tensor, the "auto" one falls back to float32 with a warning (the merge is kept)."""
    dtype = getattr(torch, name)
    limit = torch.finfo(dtype).max
    peaks = {key: float(tensor.detach().abs().max()) for key, tensor in model.named_parameters()
             if tensor.is_floating_point() and tensor.numel()} if limit < torch.finfo(torch.float32).max else {}
    too_large = next((key for key, peak in peaks.items() if peak > limit), None)
    if too_large is not None:
        largest = peaks[too_large]
        if asked:
            raise MergeInputError(
                f"the merged weight {too_large!r} holds values up to {largest:.3g}, beyond {name}'s largest "
                f"({limit:.3g}); save it as float32 or bfloat16 ({option_hint('out_dtype')})")
        logger.warning("the merged weight %r holds values up to %.3g, beyond %s's largest (%.3g): the merged model "
                       "is float32 instead (pass %s to choose)", too_large, largest, name, limit,
                       option_hint("out_dtype"))
        name, reason, dtype = FALLBACK, f"{reason}, but {too_large} exceeds {name}'s range: {FALLBACK}", torch.float32
    if any(t.is_floating_point() and t.dtype != dtype for t in list(model.parameters()) + list(model.buffers())):
        model.to(dtype)
    model.config.dtype = dtype
    for key in model.config.sub_configs:
        sub_config = getattr(model.config, key, None)
        if sub_config is not None:
            sub_config.dtype = dtype
    logger.info("merged weights in %s: %s%s", name, reason,
                "" if asked else f" ({option_hint('out_dtype')} chooses another)")
    return name, reason
