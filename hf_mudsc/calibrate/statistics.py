"""Calibration: batches of model inputs -> forward hooks on both parents -> streaming correlation statistics.

Both parents see the same batches in eval mode, float32, without gradients; every hooked position
(token or image) is one sample, padding (the batch's `attention_mask` 0) dropped. Statistics are plain sums,
so process shards add up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_mudsc.blas import torch_thread_count
from hf_mudsc.calibrate.correlation import CorrelationAccumulator
from hf_mudsc.calibrate.layer_inputs import FORWARD_ERRORS, unrunnable_batch
from hf_mudsc.calibrate.layer_inputs import forward_inputs as forward_inputs  # re-exported
from hf_mudsc.errors import CalibrationError, MergeInputError, option_hint, parent_label
from hf_mudsc.heap import release_free_heap
from hf_mudsc.load.objects import whole_sequences
from hf_mudsc.progress import Progress
from hf_mudsc.spec import HookPoint, PermutationSpec

logger = logging.getLogger(__name__)

# Products per batch in float32 on mean-shifted activations, summed in float64 (docs/design.md §4.1 "fp32 with care"):
# fp64 GEMMs run at about half the fp32 rate on CPUs, and the per-batch error (~1e-7 relative) never
# accumulates across batches. "float64" keeps every product in float64.
STATISTICS_DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_STATISTICS_DTYPE = "float32"


def statistics_dtype_of(name: str | torch.dtype) -> torch.dtype:
    """`"float32"`/`"float64"` (or the torch dtype) -> the dtype of the statistics GEMMs; anything else is refused."""
    if isinstance(name, torch.dtype) and name in STATISTICS_DTYPES.values():
        return name
    if isinstance(name, str) and name in STATISTICS_DTYPES:
        return STATISTICS_DTYPES[name]
    raise CalibrationError(
        f"statistics_dtype must be one of {', '.join(STATISTICS_DTYPES)}, got {name!r}"
    )




def new_accumulators(spec: PermutationSpec, statistics_dtype: str | torch.dtype = DEFAULT_STATISTICS_DTYPE,
                     num_models: int = 2) -> list[CorrelationAccumulator]:
    """One empty `[A; B]` accumulator per spec group (`[parent 0; ...; parent N-1]` for N models: its sums are
    `(N·n, N·n)`, so memory grows with N², docs/design.md §4.1)."""
    dtype = statistics_dtype_of(statistics_dtype)
    return [CorrelationAccumulator(num_models * group.width, dtype=dtype) for group in spec.groups]




def batch_column_as_tensor(value: Any) -> torch.Tensor | Any:
    """A batch column as a tensor when it is numeric (tensors/arrays stacked), else unchanged (e.g. strings);
    shared with evaluation so test batches are built like calibration batches."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        return torch.from_numpy(np.stack(value))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError):
            if all(_numbers(item) for item in value):  # rows of numbers of unequal lengths (text not padded)
                raise TypeError("rows of unequal lengths") from None
            return value
    return value


def _numbers(item: Any) -> bool:
    """Whether `item` is a row of plain numbers (a list or tuple of ints/floats, nested alike)."""
    if isinstance(item, (list, tuple)):
        return bool(item) and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) or _numbers(x)
                                  for x in item)
    return False


def _row_shape(item: Any) -> tuple[int, ...]:
    """A row's shape for messages: a tensor's or array's, a list's length (nested lists: their first's too)."""
    if hasattr(item, "shape"):
        return tuple(item.shape)
    if isinstance(item, (list, tuple)):
        return (len(item), *(_row_shape(item[0]) if item and isinstance(item[0], (list, tuple)) else ()))
    return ()


def _raw_length(raw: Mapping[str, Any]) -> int:
    """Rows in a batch as read (its first sized column), for messages."""
    return next((len(v) for v in raw.values() if hasattr(v, "__len__") and not isinstance(v, str)), 0)


def _column(name: str, value: Any, before: int, rows: str) -> torch.Tensor | Any:
    """`batch_column_as_tensor`, with a row that does not stack with the others (another shape, no value: a stream's
    bad row mid-way) named in one line instead of torch's error."""
    try:
        return batch_column_as_tensor(value)
    except (RuntimeError, TypeError):
        items = list(value)
        missing = next((index for index, item in enumerate(items) if item is None), None)
        if missing is not None:
            raise CalibrationError(f"calibration column {name!r}: row {before + missing + 1} (of {rows}) has no value; "
                                   "every row needs every input column") from None
        shapes = list(dict.fromkeys(_row_shape(item) for item in items))
        raise CalibrationError(f"calibration column {name!r}: {rows} hold inputs of shapes "
                               f"{' and '.join(str(shape) for shape in shapes[:2])}, which do not stack into one "
                               "batch; give every row the same shape (resize or pad them)") from None


def _batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise CalibrationError(f"calibration batch has no tensor column (columns: {sorted(batch)})")


def _truncate(batch: dict[str, Any], size: int) -> dict[str, Any]:
    return {k: (v[:size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}




def _flag(value: Any) -> bool:
    """A batch's boolean model argument (`interpolate_pos_encoding`), given as a bool or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and bool(value.item())
    return bool(value)


@dataclass
class ModelInputCheck:
    """What the parents' config says their model inputs must be, checked on each batch before any forward: pre-made
    `input_ids` from another vocabulary failed inside the embedding (`index out of range in self`, a device-side
    assert on a GPU), `pixel_values` of another size with transformers' message. Unnormalised uint8 pixels and padded
    ids without an `attention_mask` run, but not as the parents were trained / as the README says (padding masked
    out): each is said once (`warnings`, for the merge's); no mask is inferred (a pad id may be a real token, and
    transformers infers none either)."""

    vocab_size: int | None = None
    type_vocab_size: int | None = None
    """Segment ids (`token_type_ids`) the models embed (BERT: 2, RoBERTa: 1); past them the embedding fails alike."""
    pad_token_id: int | None = None
    num_channels: int | None = None
    image_size: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)
    data: str = "calibration"
    """What messages call the data (`evaluation`: evaluate's inputs are checked alike)."""
    models: str = "the parents"
    """Whose config and processor the messages name (`the model`)."""
    error: type[Exception] = CalibrationError
    max_tokens: int | None = None
    """The longest `input_ids` the models read (their position embeddings end there): evaluation checks it here;
    calibration's `iter_batches` checks it itself (`_check_length`)."""
    preprocessed: tuple[str, ...] = ()
    """The inputs the processor made from raw columns (`pixel_values`, `input_ids`): advising to pass raw data would
    advise what was done; the processor and the config disagree."""
    quiet: bool = False
    """Warnings kept in `warnings`, not logged (a check ahead of the merge's pass, which says them)."""

    @classmethod
    def of(cls, config: Any, **naming: Any) -> ModelInputCheck:
        """From a parent's config (CLIP: the text config's vocabulary, the vision config's image size); `naming`:
        `data`, `models`, `error` for another use of the check than calibration."""
        text = getattr(config, "text_config", None) or config
        vision = getattr(config, "vision_config", None) or config

        def number(owner: Any, name: str) -> int | None:
            value = getattr(owner, name, None)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        from hf_mudsc.calibrate.datasets import image_side

        side = image_side(getattr(vision, "image_size", None))
        has_images = side is not None
        return cls(vocab_size=number(text, "vocab_size"), type_vocab_size=number(text, "type_vocab_size"),
                   pad_token_id=number(text, "pad_token_id"),
                   num_channels=number(vision, "num_channels") if has_images else None, image_size=side, **naming)

    @property
    def _whose(self) -> str:
        return f"{self.models}'" if self.models.endswith("s") else f"{self.models}'s"

    @property
    def _preprocess(self) -> str:
        if "pixel_values" in self.preprocessed:
            return ("they were made from the raw images by the image processor, whose output disagrees with the "
                    "config: set its size (crop_size when it center-crops) in preprocessor_config.json to the config's "
                    "image_size")
        return f"preprocess the images with {self._whose} image processor (or pass raw images, which are)"

    @property
    def _tokenize(self) -> str:
        if "input_ids" in self.preprocessed:
            from hf_mudsc.calibrate.datasets import VOCABULARY_FIX

            return ("they were made from the raw text by the tokenizer, which knows more tokens than the config: "
                    + VOCABULARY_FIX)
        return f"tokenize the text with {self._whose} tokenizer (or pass raw text, which is)"

    @property
    def _segments(self) -> str:
        if "input_ids" in self.preprocessed:  # text pairs tokenized for a model trained on single texts
            return f"read one text column ({option_hint('text_column')}), or use models trained on text pairs"
        return (f"pass the token_type_ids {self._whose} tokenizer makes (0 for single texts), or leave the column out "
                "(read as 0)")

    def _say(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            if not self.quiet:
                logger.warning("%s", text)

    def __call__(self, batch: Mapping[str, Any]) -> None:
        longest = batch.get("input_ids")
        if (self.max_tokens is not None and isinstance(longest, torch.Tensor) and longest.dim() >= 2
                and longest.shape[-1] > self.max_tokens):
            raise self.error(
                f"{self.data} input_ids hold sequences of {longest.shape[-1]} tokens, but {self.models} read at most "
                f"{self.max_tokens} (their position embeddings end there): tokenize with truncation=True, "
                f"max_length={self.max_tokens}, or pass raw text, which is cut to fit")
        for name, value in batch.items():  # every pass refuses them alike (regmean's solve, fisher, the refit too)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                bad = ~torch.isfinite(value.reshape(len(value), -1) if value.dim() else value.reshape(1, 1))
                if bool(bad.any()):
                    rows = int(bad.any(dim=-1).sum())
                    raise self.error(f"{self.data} {name} hold NaN or inf in {rows} of the {len(bad)} examples of a "
                                     "batch, which no model reads as input: drop or fix those examples")
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 1:  # one row's tokens (a list of rows passed as batches)
            raise self.error(
                f"{self.data} input_ids have shape {tuple(ids.shape)}, one example's tokens, but {self.models} read "
                "(batch, tokens): pass batches (rows stacked, e.g. by a DataLoader or the tokenizer called on a list "
                "of texts) or the rows as a datasets.Dataset")
        if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
            largest = int(ids.max())
            if self.vocab_size is not None and largest >= self.vocab_size:
                raise self.error(
                    f"{self.data} input_ids hold token id {largest}, but {self._whose} vocabulary has "
                    f"{self.vocab_size} tokens (config vocab_size): {self._tokenize}")
            if (self.pad_token_id is not None and batch.get("attention_mask") is None
                    and bool((ids == self.pad_token_id).any())):
                self._say(f"{self.data} input_ids hold {self._whose} pad token id {self.pad_token_id} but no "
                          "attention_mask, so those positions are read as real tokens (no mask is "
                          "inferred: the id may be a real token); pass attention_mask with the input_ids (the "
                          "tokenizer returns one), or raw text")
        segments = batch.get("token_type_ids")
        if (self.type_vocab_size is not None and isinstance(segments, torch.Tensor) and segments.numel()
                and not segments.is_floating_point() and int(segments.max()) >= self.type_vocab_size):
            raise self.error(
                f"{self.data} token_type_ids hold segment id {int(segments.max())}, but {self._whose} config has "
                f"type_vocab_size {self.type_vocab_size} (segment ids 0 to {self.type_vocab_size - 1}): "
                f"{self._segments}")
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor) and mask.shape != ids.shape:
            raise self.error(  # a shorter mask was dropped as no mask: padding read as tokens, without a word
                f"{self.data} attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: one "
                f"mask value per token is needed; pass the attention_mask {self._whose} tokenizer returns with the "
                "input_ids (or raw text)")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
            empty = int((mask == 0).all(dim=1).sum())
            if empty:
                raise self.error(
                    f"{self.data} attention_mask is all 0 for {empty} of the {len(mask)} examples of a batch (no token "
                    f"of theirs is read): drop those examples, or pass the attention_mask {self._whose} tokenizer "
                    "returns (1 on real tokens)")
        pixels = batch.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and self.image_size is not None:
            expected = (self.num_channels, *self.image_size) if self.num_channels is not None else None
            # `interpolate_pos_encoding=True` runs the model at any resolution: then only the channels must match
            any_size = _flag(batch.get("interpolate_pos_encoding"))
            channels_fit = pixels.dim() == 4 and self.num_channels in (None, pixels.shape[1])
            size_fits = any_size or tuple(pixels.shape[2:]) == self.image_size
            if not (channels_fit and size_fits):
                wanted = ", ".join(map(str, expected or ("channels", *self.image_size)))
                reads = "read" if self.models.endswith("s") else "reads"
                raise self.error(
                    f"{self.data} pixel_values have shape {tuple(pixels.shape)}, but {self.models} {reads} (batch, "
                    f"{wanted}) (config num_channels, image_size): {self._preprocess}")
            if pixels.dtype == torch.uint8:
                take = "take" if self.models.endswith("s") else "takes"
                self._say(f"{self.data} pixel_values are uint8 (unnormalised 0..255 pixels): {self.models} {take} "
                          f"float pixel values normalised by {self._whose} image processor; {self._preprocess}")


def iter_batches(
    calibration: Any,
    *,
    batch_size: int = 32,
    num_samples: int | None = None,
    columns: Iterable[str] | None = None,
    required: Iterable[str] = (),
    max_tokens: int | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield dict batches of tensors from a `datasets.Dataset`/`IterableDataset` or an iterable of dicts.

    Only `columns` are kept when given (datasets carry labels and raw fields the model must not see);
    `required` columns are checked up front so a wrong dataset fails before any forward pass, and so are
    `input_ids` longer than `max_tokens` (`PermutationSpec.max_tokens`), which would fail inside the model, and
    whatever `check` refuses (`ModelInputCheck`: ids past the vocabulary, images of another shape).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    keep = set(columns) if columns is not None else None
    required = tuple(required)
    seen = 0
    for index, raw in enumerate(_raw_batches(calibration, batch_size, keep, required)):
        if index == 0:
            _check_columns(raw.keys(), required, batches=not _is_data_object(calibration))
        rows = f"rows {seen + 1}-{seen + _raw_length(raw)}"
        batch = {k: _column(k, v, seen, rows) for k, v in raw.items() if keep is None or k in keep}
        _check_length(batch, max_tokens)
        if check is not None:
            check(batch)
        if not any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in batch.values()):
            wanted = f" (the models read {sorted(keep)})" if keep else ""
            raise CalibrationError(f"calibration {rows} hold no input column the models read{wanted}: their columns "
                                   f"are {sorted(raw)}; every row needs the same input columns")
        size = _batch_size_of(batch)
        if num_samples is not None and seen + size > num_samples:
            batch = _truncate(batch, num_samples - seen)
            size = num_samples - seen
        if size == 0:
            continue
        yield batch
        seen += size
        if num_samples is not None and seen >= num_samples:
            return


def _check_length(batch: Mapping[str, Any], max_tokens: int | None) -> None:
    ids = batch.get("input_ids")
    if max_tokens is not None and isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[-1] > max_tokens:
        raise CalibrationError(
            f"a calibration batch holds sequences of {ids.shape[-1]} tokens, but the parents read at most "
            f"{max_tokens} (their position embeddings end there): tokenize with truncation=True, "
            f"max_length={max_tokens}, or pass raw text, which is cut to fit"
        )


def check_first_batch(calibration: Any, config: Any, required: Iterable[str]) -> None:
    """A list of input batches — read again on every pass, so its first batch is at hand before any weights — refused
    as `iter_batches` would refuse it once the parents are loaded: a missing model input (`required`), and what
    `ModelInputCheck` refuses from the parents' `config` (images of another size, ids past the vocabulary). A one-shot
    iterator is checked as it is read; the dry run leaves batches to the merge."""
    if not isinstance(calibration, (list, tuple)) or not calibration or not isinstance(calibration[0], Mapping):
        return
    first = calibration[0]
    _check_columns(first.keys(), tuple(required), batches=True)
    check = ModelInputCheck.of(config, quiet=True)  # its warnings: said by the merge's pass
    check({name: value for name, value in first.items() if isinstance(value, torch.Tensor)})


def _check_columns(found: Iterable[str], required: tuple[str, ...], *, batches: bool = False) -> None:
    """Refuse data lacking a model input. `batches`: the data are dict batches (a list, a DataLoader), whose other
    columns (raw `image`, `text`) are read as they are: only a `datasets` object's raw columns are preprocessed by the
    parents' processor, which the fix then names."""
    from hf_mudsc.calibrate.datasets import MODEL_INPUT_COLUMNS

    found = sorted(found)
    missing = [name for name in required if name not in found]
    if missing:
        raw = [name for name in found if name not in MODEL_INPUT_COLUMNS]
        fix = ("Provide preprocessed model inputs (e.g. map the parents' processor over the dataset)." if not
               (batches and raw) else
               f"Batches are passed to the models as they are, so their raw column(s) {raw} are not preprocessed: "
               "pass the rows as a datasets.Dataset (e.g. datasets.Dataset.from_list(rows), or the dataset itself "
               "instead of a DataLoader over it), whose raw columns the parents' processor preprocesses, or make "
               "the model inputs in your batches (e.g. a DataLoader collate_fn calling the processor).")
        raise CalibrationError(f"the calibration data lacks column(s) {missing} that the models need; found columns "
                               f"{found}. {fix}")


def _is_data_object(calibration: Any) -> bool:
    """Whether `calibration` is rows (a `datasets` object or a `CalibrationStream`), not dict batches."""
    import datasets

    from hf_mudsc.calibrate.datasets import CalibrationStream

    return isinstance(calibration, (CalibrationStream, datasets.Dataset, datasets.IterableDataset))


def _raw_batches(
    calibration: Any, batch_size: int, keep: set[str] | None, required: tuple[str, ...]
) -> Iterator[Mapping[str, Any]]:
    import datasets

    from hf_mudsc.calibrate.datasets import CalibrationStream

    if isinstance(calibration, CalibrationStream):
        yield from calibration.batches(batch_size)
        return
    if isinstance(calibration, (datasets.Dataset, datasets.IterableDataset)):
        names = calibration.column_names
        if names is not None:
            _check_columns(names, required)
            if keep is not None:
                calibration = calibration.select_columns([c for c in names if c in keep])
        data = calibration.with_format("torch")
        if isinstance(data, datasets.Dataset):
            for start in range(0, len(data), batch_size):
                yield data[start : start + batch_size]
        else:
            yield from data.iter(batch_size=batch_size)
        return
    if isinstance(calibration, Mapping):
        yield calibration
        return
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(
            f"calibration must be a datasets.Dataset/IterableDataset or an iterable of dict batches, "
            f"got {type(calibration).__name__}"
        )
    from hf_mudsc.calibrate.datasets import collated_safely

    for batch in collated_safely(calibration):
        if not isinstance(batch, Mapping):
            raise CalibrationError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
        yield batch


class _Recorder:
    """Forward hooks handing each group's features for the current batch to `sink(group, hook, features)`.

    Parent A's sink stores them; parent B's sink folds them into the statistics at once, so a batch never
    holds both parents' features of every group (for ViT-B at batch 32 that is 1.4 GB instead of 2.8 GB).
    """

    def __init__(self, model: nn.Module, spec: PermutationSpec,
                 sink: Callable[[int, int, torch.Tensor], None]) -> None:
        self.sink = sink
        modules = dict(model.named_modules())
        self.handles = []
        for gi, group in enumerate(spec.groups):
            for hi, hook in enumerate(group.hooks):
                self.handles.append(
                    modules[hook.module].register_forward_hook(self._hook(gi, hi, hook), with_kwargs=True)
                )

    def _hook(self, gi: int, hi: int, point: HookPoint):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if point.where == "input":
                value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            else:
                value = getattr(output, point.attr) if point.attr else output
                if isinstance(value, tuple):
                    value = value[0]
            self.sink(gi, hi, value.detach())

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _BatchStatistics:
    """Joins the last parent's features with the stored features of the parents before it (same hook) and updates
    that group's accumulator with `[x_0; x_1; ...]`.

    `running` says whose forward is under way: hooks of the other parents stay silent, which matters when
    parents share modules (the same model object passed twice) — each forward is then seen by every recorder.
    """

    def __init__(self, spec: PermutationSpec, accumulators: list[CorrelationAccumulator],
                 num_models: int = 2) -> None:
        self.spec = spec
        self.accumulators = accumulators
        self.num_models = num_models
        self.features_a: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.batch: Mapping[str, Any] = {}
        self.updated: dict[int, None] = {}  # groups in the order their hooks fired: the forward's order
        self.running: int | None = None
        self.error: BaseException | None = None

    def start(self, batch: Mapping[str, Any]) -> None:
        self.features_a.clear()
        self.updated.clear()
        self.batch = batch
        self.running = None

    def sink(self, model: int) -> Callable[[int, int, torch.Tensor], None]:
        """The hook sink of parent `model`: the last parent's joins and updates, the others' store."""
        if model == self.num_models - 1:
            return self.add_b
        return lambda gi, hi, features: self.store(model, gi, hi, features)

    def store(self, model: int, gi: int, hi: int, features: torch.Tensor) -> None:
        if self.running != model:
            return
        stored = self.features_a.setdefault((gi, hi), [])
        if len(stored) < model:  # an earlier parent's features of this hook are missing
            return
        del stored[model:]
        stored.append(features)

    def store_a(self, gi: int, hi: int, features: torch.Tensor) -> None:
        self.store(0, gi, hi, features)

    def add_b(self, gi: int, hi: int, features: torch.Tensor) -> None:
        if self.running != self.num_models - 1:
            return
        features_a = self.features_a.pop((gi, hi), None)
        if features_a is None or len(features_a) != self.num_models - 1:
            return
        try:
            joint = torch.cat([*features_a, features], dim=-1)
            del features_a
            self.accumulators[gi].update(_samples(joint, self.spec.groups[gi].hooks[hi], self.batch))
        except Exception as error:  # a statistics failure, not the model's: re-raised as is by the caller
            self.error = error
            raise
        self.updated[gi] = None

    def check(self) -> None:
        for gi, group in enumerate(self.spec.groups):
            if gi not in self.updated:
                raise CalibrationError(f"group {group.name!r} saw no activations for this batch")
        self.features_a.clear()


def check_finite_statistics(spec: PermutationSpec, accumulators: Sequence[CorrelationAccumulator], num_models: int,
                            examples: int, order: Sequence[int] | None = None,
                            batch: Mapping[str, Any] | None = None) -> None:
    """Refuse activations float32 could not hold, after the batch that produced them: a parent whose weights are
    finite but extreme (3e38) yields inf/NaN activations — or activations whose squares overflow the float32
    products — which otherwise surface only after calibration, as NaN similarities naming nothing.

    Each group's `Σx` and the diagonal of its `Σxxᵀ` are enough (O(width) per batch): an inf or NaN in any sample
    reaches `Σx` (inf − inf is NaN too), and every off-diagonal sum is bounded by two diagonal ones
    (Cauchy–Schwarz: |Σxᵢxⱼ| ≤ √(Σxᵢ²·Σxⱼ²)), so finite diagonals mean finite sums. The units of parent i are the
    i-th block of each group's `[x_0; x_1; ...]`: the parents whose blocks broke are named; when all did, the
    calibration data is the likelier cause. `order`: the groups' indices in the order the forward reaches them
    (spec order when None), so the group named is the first one the overflow reached. `batch`: the batch that
    broke them; when only some parents broke, its largest floating-point input is named too (huge data overflows
    the parent that amplifies it most first, so the weights are not the only suspect).
    """
    for index in order if order is not None else range(len(spec.groups)):
        group, accumulator = spec.groups[index], accumulators[index]
        if accumulator.count == 0:
            continue
        finite = torch.isfinite(accumulator.total) & torch.isfinite(accumulator.outer.diagonal())
        if bool(finite.all()):
            continue
        width = accumulator.dim // num_models
        broken = [i for i in range(num_models) if not bool(finite[i * width:(i + 1) * width].all())]
        hook = group.hooks[0]
        where = f"group {group.name!r} (the {hook.where} of {hook.module!r}) after {examples} calibration examples"
        if len(broken) == num_models:
            raise CalibrationError(
                f"every parent's activations are infinite or NaN at {where}: the calibration data holds infinite or "
                "NaN values, or values too large for float32 — check the data (or every parent's weights)")
        labels = [parent_label(i) for i in broken]
        whose = (f"parent {labels[0]}'s activations are" if len(labels) == 1
                 else f"the activations of parents {', '.join(labels)} are")
        scale = _largest_input(batch or {})
        data = (f", or the calibration data's values (up to {scale[1]:.3g} in {scale[0]}) are too large for it; check "
                "the data's scale," if scale is not None else ";")
        raise MergeInputError(
            f"{whose} infinite or NaN at {where}, while the other parents' are finite on the same data: its weights "
            "are out of the range float32 holds (values near 3.4e38, or large enough that their products overflow)"
            f"{data} re-export that parent's checkpoint, or merge without it")


def _largest_input(batch: Mapping[str, Any]) -> tuple[str, float] | None:
    """(column, largest |value|) over a batch's floating-point tensors (pixel values, embeddings), or None."""
    peaks = [(name, float(value.detach().abs().max())) for name, value in batch.items()
             if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()]
    return max(peaks, key=lambda peak: peak[1]) if peaks else None


class ExampleDigests:
    """A 16-byte digest of every calibration example read, to count the ones that repeat an earlier one: repeats add
    nothing to the statistics, yet count as rows in the size warning. An example is its input tensors' rows; a
    token row without its padding (the `attention_mask`'s zeros), so a repeat padded to another length is one."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def repeats(self, batch: Mapping[str, Any], size: int) -> int:
        """How many of the batch's `size` examples were seen before (in this batch or earlier ones)."""
        mask = batch.get("attention_mask")
        mask = mask.to(torch.bool) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        columns = [(name, value) for name, value in sorted(batch.items())
                   if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == size]
        from hf_mudsc.calibrate.datasets import batch_digest

        found = 0
        for row in range(size):
            key = batch_digest({name: value[row][mask[row]] if mask is not None and
                                tuple(value.shape[:2]) == tuple(mask.shape) else value[row]
                                for name, value in columns})
            found += key in self.seen
            self.seen.add(key)
        return found


def _samples(features: torch.Tensor, point: HookPoint, batch: Mapping[str, Any]) -> torch.Tensor:
    """Flatten `(..., d)` features into `(samples, d)`, dropping masked (padding) positions."""
    mask = batch.get(point.mask) if point.mask else None
    if isinstance(mask, torch.Tensor) and features.dim() == 3 and tuple(mask.shape) == tuple(features.shape[:2]):
        return features[mask.to(torch.bool)]
    return features.reshape(-1, features.shape[-1])


def _single_device(model: nn.Module) -> torch.device | None:
    """The one device holding all of `model`'s parameters and buffers (None when spread or empty)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def collect_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    batches: Iterable[Mapping[str, Any]],
    *,
    progress: bool = True,
    accumulators: list[CorrelationAccumulator] | None = None,
    total: int | None = None,
    allow_empty: bool = False,
    statistics_dtype: str | torch.dtype = DEFAULT_STATISTICS_DTYPE,
    device: str | torch.device | None = None,
    others: Sequence[nn.Module] = (),
) -> list[CorrelationAccumulator]:
    """Run both parents over the batches and accumulate each group's `[A; B]` activation statistics.

    `others`: parents after the first two; each group's statistics are then those of `[x_0; x_1; ...; x_{N-1}]`.

    With a `device`, the parents and each batch are moved there for the forwards (the parents are moved
    back afterwards: inputs are left as they were); the statistics' float64 sums stay on the CPU.

    `total` (samples, when known) sizes the progress bar, which shows samples/s. `allow_empty` lets one
    process of a distributed run hold no samples (its zero sums still join the all-reduce).
    `statistics_dtype` is the GEMM dtype of new accumulators (see `STATISTICS_DTYPES`).
    """
    models = [model_a, model_b, *others]
    if accumulators is None:
        accumulators = new_accumulators(spec, statistics_dtype, len(models))
    statistics = _BatchStatistics(spec, accumulators, len(models))
    recorders = [_Recorder(model, spec, statistics.sink(i)) for i, model in enumerate(models)]
    was_training = [model.training for model in models]
    homes = [_single_device(model) for model in models]
    target = torch.device(device) if device is not None else None
    for model in models:
        model.eval()
    seen = 0
    digests = ExampleDigests()
    bar = Progress(desc="calibration", unit="samples", total=total, enabled=progress, rate=True)
    try:
        # The Grams' BLAS (scipy's ?syrk) uses as many threads as torch does.
        with torch.no_grad(), torch_thread_count(), whole_sequences(models):
            if target is not None:
                for model, home in zip(models, homes):
                    if home is not None and home != target:
                        model.to(target)
            for batch in batches:
                if target is not None:
                    batch = {k: v.to(target) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                statistics.start(batch)
                for side, model in enumerate(models):
                    statistics.running = side
                    try:
                        model(**forward_inputs(model, batch))
                    except FORWARD_ERRORS as error:
                        if error is statistics.error:  # the statistics' own failure, not the model's
                            raise
                        raise unrunnable_batch(model, batch, error) from error
                statistics.check()
                size = _batch_size_of(batch)
                repeats = digests.repeats(batch, size)
                for accumulator in accumulators:
                    accumulator.examples += size
                    accumulator.repeats += repeats
                seen += size
                check_finite_statistics(spec, accumulators, len(models), seen, order=list(statistics.updated),
                                        batch=batch)
                bar.update(size)
    finally:
        bar.close()
        statistics.start({})
        for recorder in recorders:
            recorder.remove()
        for model, training in zip(models, was_training):
            model.train(training)
        for model, home in zip(models, homes):
            if home is not None and _single_device(model) != home:
                model.to(home)
        release_free_heap()  # the freed per-batch feature buffers would add to the solve's peak
    if seen == 0 and not allow_empty:
        raise CalibrationError("the calibration data has no samples; pass a non-empty dataset or batches")
    # DEBUG: merge() says each pass's count once, with what the pass was for (a check's statistics, the method's).
    logger.debug("collected activation statistics over %d calibration samples", seen)
    return accumulators
