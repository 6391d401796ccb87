"""Warnings for merges likely to disappoint (docs/design.md, "Warnings"): logged, kept in `MergeReport.warnings`,
`config.mudsc["warnings"]` and the model card. Each check is a pure function of numbers the merge already has,
so the dry run and the merge share them.

1. A *weak group*: its match value is far below the other groups'. "Far" is a robust outlier rule: below
   `median − 3 × 1.4826 × MAD` of all groups' values (MAD scaled to a standard deviation, the usual robust
   3-sigma) AND at least `WEAK_GROUP_MIN_GAP` below the median — match values of healthy merges vary by a few
   hundredths between groups, and a MAD of nearly equal values would flag a 0.01 dip. Needs `WEAK_GROUP_MIN_GROUPS`
   groups for a median to mean anything.
2. *Too little calibration data*: a group's correlation is a `(2n × 2n)` matrix over the stacked `[A; B]` units
   estimated from the rows its hook saw (examples × tokens, padding dropped; one per example where the group is
   read at the first token, e.g. BERT's pooler input). With fewer rows than `2n` it is
   rank-deficient: most unit pairs are then matched on noise. *Repeated examples* (`repeated_examples_warning`):
   examples that repeat earlier ones add nothing, yet count as rows there.
3. *Method against relation*: a method without unit matching (`average`, task-vector methods) on parents that
   are not fine-tunes of one base fuses unrelated units; a unit-matching method on fine-tunes of one base only
   reorders units that already correspond (a plain average or a task-vector method keeps the base's alignment
   and needs no data); parents that are the same model give back that model.
4. *Default label names*: parents whose heads share a label set only because every label is transformers'
   placeholder (`LABEL_0`, `LABEL_1`, ...: a model saved without `id2label`). Their heads are fused as one task,
   which is wrong when they were trained on different tasks (two binary classifiers of different questions);
   the names cannot tell, so the user is told how to keep the heads apart (not for a permuted copy or the same
   model: one function, so one task).
5. *Different image processors or tokenizers* (lower-casing, vocabulary, max length, ...): the merged model ships
   parent A's processor, so every other parent's task is served with A's preprocessing (and raw calibration images
   and text are preprocessed with it).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from hf_mudsc.options import MergeOptions, option_hint

WEAK_GROUP_MAD_FACTOR = 3.0
MAD_TO_SIGMA = 1.4826
WEAK_GROUP_MIN_GAP = 0.1
WEAK_GROUP_MIN_GROUPS = 4
# Relations (hf_mudsc.load.relation.ParentRelation.relation) whose units correspond without matching.
ALIGNED_RELATIONS = ("shared base",)
UNALIGNED_RELATIONS = ("independent", "permuted copy")
#: The `logging` extra attribute (`record.mudsc_advice`, True) of a warning whose fix is another choice of method,
#: data or options (`advice_warnings`) rather than a fault of the result: a caller that made that choice on
#: purpose (`hf-mudsc demo`'s baselines) filters these records out; the report, config and card keep the text.
ADVICE = "mudsc_advice"


def weak_groups(names: Sequence[str], values: Sequence[float]) -> list[tuple[str, float, float]]:
    """(name, value, threshold) of each group whose match value is far below the others' (module docstring)."""
    finite = [float(v) for v in values if v == v]
    if len(finite) < WEAK_GROUP_MIN_GROUPS:
        return []
    median = statistics.median(finite)
    mad = statistics.median(abs(v - median) for v in finite)
    threshold = min(median - WEAK_GROUP_MAD_FACTOR * MAD_TO_SIGMA * mad, median - WEAK_GROUP_MIN_GAP)
    return [(name, float(value), threshold) for name, value in zip(names, values) if value < threshold]


def weak_group_warning(names: Sequence[str], values: Sequence[float]) -> str | None:
    weak = weak_groups(names, values)
    if not weak:
        return None
    median = statistics.median(float(v) for v in values if v == v)
    shown = ", ".join(f"{name} {value:.3f}" for name, value, _ in weak[:5]) + (", ..." if len(weak) > 5 else "")
    return (f"{len(weak)} group(s) match far worse than the others (median {median:.3f}; below "
            f"{weak[0][2]:.3f}): {shown} — the parents' units there have no good counterpart, so the merged layer "
            "serves both tasks poorly; check the parents are of one kind, or add calibration data")


def calibration_size_warning(rows: Mapping[str, int], widths: Mapping[str, int], parents: int = 2) -> str | None:
    """Warn when a group saw fewer calibration rows (one per token its hook reads) than the `N·n` units it correlates
    (N = `parents`); names the widest such group. `rows`/`widths`: per group name."""
    short = [(name, rows[name], width) for name, width in widths.items()
             if name in rows and rows[name] < parents * width]
    if not short:
        return None
    name, seen, width = max(short, key=lambda item: (item[2], -item[1]))
    return (f"calibration too small for the widths: group {name!r} ({width} units per parent) saw {seen} rows "
            "(one per token read; one per example for a group read at the first token only), fewer than the "
            f"{parents * width} units it correlates, so its correlations are rank-deficient ({len(short)} group(s) "
            f"affected); give more samples ({option_hint('num_samples')} or a larger calibration split)")


def repeated_examples_warning(examples: int, repeats: int) -> str | None:
    """Warn when calibration examples repeat earlier ones (`ExampleDigests`): a repeat adds nothing to the statistics,
    yet counts as rows in `calibration_size_warning`, so the data is smaller than it looks."""
    if repeats <= 0 or examples <= 0:
        return None
    distinct = examples - repeats
    return (f"the calibration data repeats examples: {distinct} distinct among the {examples} read, so the statistics "
            f"are those of {distinct} example{'s' if distinct != 1 else ''} (a repeat adds nothing, yet counts toward "
            f"{option_hint('num_samples')}); pass distinct examples")


def relation_warning(relation: str, method: Any, refitting: bool = False, gated: bool = True,
                     units_correspond: bool = True) -> str | None:
    """Warn when the parents' relation makes the method a poor fit; `method` is a registry `MergeMethod`,
    `refitting`: a refit follows the merge (the resolved `refit` is ridge or gate), which rebuilds a merge by position
    from the data — then a collapse is not what the user gets (docs/design.md §4.9); `gated`: that refit is the gate's
    (kept only if it agrees better), not a forced ridge; `units_correspond`: False when the unit matching moved most
    units of fine-tunes of one base (`hf_mudsc.methods.auto.units_correspond`) — then matching was needed."""
    if relation == "same model":
        if method.needs_base_model:  # its task vectors are trimmed, dropped or scaled: not the model again
            return (f"the parents are the same model: {method.name!r} rebuilds it from the base and its task vector "
                    "as that method changes it, not the model itself; 'linear' gives back that model")
        return "the parents are the same model: the merge gives back that model"
    if relation in UNALIGNED_RELATIONS and not method.matches_units:
        start = (f"method {method.name!r} fuses units by position, but the parents are {relation} models whose "
                 "units do not correspond: ")
        if refitting:
            kept = " (kept only if it agrees better with the parents on held-out samples)" if gated else ""
            return (start + "alone that merge collapses; the refit that follows rebuilds every linear layer from "
                    f"the calibration data{kept}, "
                    f"while a unit-matching method such as 'mudsc' starts from corresponding units "
                    f"({option_hint('method')})")
        return (start + "the merge will likely collapse; use a unit-matching method such as "
                f"'mudsc' ({option_hint('method')})")
    if relation in ALIGNED_RELATIONS and method.matches_units and units_correspond:
        return (f"the parents are fine-tunes of one base, whose units already correspond: {method.name!r} can only "
                "reorder them; a same-base method (e.g. 'average') keeps the base's alignment and needs no "
                f"calibration data ({option_hint('method')})")
    return None


DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def default_labels_warning(label_sets: Sequence[Sequence[str]] | None) -> str | None:
    """Warn when the parents' heads are fused as one label set whose names are all transformers' placeholders
    (module docstring, 4). `label_sets`: each parent's label names when their heads share one set, else None."""
    if not label_sets or not all(DEFAULT_LABEL.fullmatch(name) for name in label_sets[0]):
        return None
    shown = ", ".join(label_sets[0][:3]) + (", ..." if len(label_sets[0]) > 3 else "")
    return (f"the parents' heads are fused as one label set because every parent's labels are transformers' "
            f"default names ({shown}); if the parents were trained on different tasks, name each parent's "
            "labels (config.id2label / label2id) before merging, so that the heads are kept side by side")


def processor_warning(differences: Sequence[str], tokenizer_differences: Sequence[str] = ()) -> str | None:
    """Warn when the parents' image processors or tokenizers differ (module docstring, 5); `differences`: the
    differing image processor settings (`hf_mudsc.load.processors.image_processor_differences`),
    `tokenizer_differences`: the tokenizers' (`hf_mudsc.load.processors.tokenizer_differences`)."""
    def shown(names: Sequence[str]) -> str:
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

    if differences and tokenizer_differences:
        return (f"the parents' image processors differ ({shown(differences)}) and so do their tokenizers "
                f"({shown(tokenizer_differences)}): the merged model ships parent A's processor, so the other parents' "
                "tasks see inputs preprocessed as A's were (and so did raw calibration data); re-save the parents "
                "with one processor, or check each task's accuracy with hf-mudsc evaluate")
    if tokenizer_differences:
        return (f"the parents' tokenizers differ ({shown(tokenizer_differences)}): the merged model ships parent A's, "
                "so the other parents' tasks see text tokenized as A's does (and so did raw calibration text); "
                "re-save the parents with one tokenizer, or check each task's accuracy with hf-mudsc evaluate")
    if not differences:
        return None
    return (f"the parents' image processors differ ({shown(differences)}): the merged model ships parent A's, so the "
            "other parents' tasks see images preprocessed as A's were (and so did raw calibration images); re-save the "
            "parents with one processor, or check each task's accuracy with hf-mudsc evaluate")


def merge_warnings(*, relation: str | None, method: Any, group_names: Sequence[str], group_values: Sequence[float],
                   rows: Mapping[str, int] | None, widths: Mapping[str, int], parents: int = 2,
                   relation_text: str | None = None, shared_labels: Sequence[Sequence[str]] | None = None,
                   processor_differences: Sequence[str] = (), tokenizer_differences: Sequence[str] = (),
                   repeats: tuple[int, int] | None = None) -> list[str]:
    """Every warning of a finished solve, in a fixed order (relation, default labels, calibration size, weak
    groups); `relation_text`: `relation_warning`'s text for this merge (computed by the caller, which also tags it as
    advice: `advice_warnings`); `shared_labels`: each parent's label names when their heads are fused as one label
    set (`default_labels_warning`); `processor_differences`, `tokenizer_differences`: the settings in which the
    parents' image processors and tokenizers differ (`processor_warning`); `repeats`: (examples read, how many repeat
    an earlier one) of the unit-matching statistics (`repeated_examples_warning`)."""
    found = [
        relation_text,
        default_labels_warning(shared_labels) if relation not in ("same model", "permuted copy") else None,
        processor_warning(processor_differences, tokenizer_differences),
        repeated_examples_warning(*repeats) if repeats else None,
        calibration_size_warning(rows, widths, parents) if rows else None,
        weak_group_warning(group_names, group_values) if method.matches_units else None,
    ]
    return [text for text in found if text]


#: Per-method options a method may fix to its own value (zipit's and weight_matching's matcher): given another value,
#: the method reads none of it although it records the option (its own value).
FIXED_BY_METHOD = ("matcher",)


def unread_options(options: MergeOptions, used: Mapping[str, Any], *, read: Collection[str] = ()) -> list[str]:
    """The per-method options set (away from their defaults) that a method reading `used` does not read: recorded
    as None or left out, or fixed by the method to another value (`FIXED_BY_METHOD`). `read`: options it reads
    though it records them as None, the value given being its default's equal (`MergeMethod.read_as_default`)."""
    unread = []
    for field in MergeOptions.option_fields():
        name = field.name
        given = getattr(options, name)
        if not field.metadata["per_method"] or given == field.default or name in read:
            continue
        if used.get(name) is None or (name in FIXED_BY_METHOD and used[name] != given):
            unread.append(name)
    return unread


def advice_warnings(relation: str | None, relation_text: str | None, data_text: str | None = None,
                    unread_text: str | None = None) -> set[str]:
    """The texts among a merge's warnings whose fix is another choice of its inputs, not a fault of its result: another
    method for the parents' relation (`relation_warning`, except for parents that are the same model: that says what
    the result is), dropping calibration data nothing reads (`unread_data_warning`) or options the method does not
    read (`unread_options_warning`). Logged with `ADVICE`, so a caller that made the choice on purpose can leave them
    out of what it shows."""
    return {text for text in (relation_text if relation != "same model" else None, data_text, unread_text) if text}


def unread_options_warning(options: MergeOptions, used: Mapping[str, Any], method: str, *,
                           read: Collection[str] = ()) -> str | None:
    """Per-method options set (away from their defaults) that the method does not read: they change nothing. A
    method records an option it ignores as None (zipit's α) or leaves it out (linear's), or records its own value
    of an option it fixes (zipit's matcher, `unread_options`). Shared by the merge and the dry run, so the plan warns
    what the merge would."""
    return unread_warning(unread_options(options, used, read=read), method)


def unread_warning(unread: Sequence[str], method: str) -> str | None:
    """"method M does not read X, Y: they have no effect" for the options `unread` (None: none)."""
    if not unread:
        return None
    return (f"method {method} does not read {', '.join(option_hint(name) for name in unread)}: "
            f"{'it has' if len(unread) == 1 else 'they have'} no effect")


def inert_options_warnings(options: MergeOptions, *, method: str, reads_base: bool, reads_data: bool,
                           has_data: bool, refit: str, pairs_heads: bool = True,
                           inputs: Sequence[str] = (), data_note: str | None = None,
                           strangers: str = "") -> list[str]:
    """Options set for a part of the merge that does not run — a refit setting with no refit (REPAIR reads
    `refit_samples` only), a calibration setting without data, a raw column of a kind the parents do not read
    (`inputs`: the model inputs they take, e.g. `PermutationSpec.inputs`), data that nothing reads — and a base given
    to a method that does not read it, head pairing for a method that pairs no heads (`pairs_heads` False): each
    changes nothing, said like an option the method does not read."""
    defaults = {f.name: f.default for f in MergeOptions.option_fields()}
    refit_names = (("refit_lambda", "refit_norms", "refit_samples") if refit == "none"
                   else ("refit_lambda", "refit_norms") if refit == "repair" else ())
    cases = [(refit_names, "no refit runs" if refit == "none" else "refit='repair' reads only refit_samples"),
             (("num_samples", "batch_size", "image_column", "text_column", "statistics_dtype") if not has_data else (),
              "no calibration data is given")]
    if has_data and reads_data and inputs:  # the column of a kind no parent reads is never preprocessed
        cases += [(("text_column",) if "input_ids" not in inputs else (),
                   f"the parents read no text (their inputs: {', '.join(inputs)})"),
                  (("image_column",) if "pixel_values" not in inputs else (),
                   f"the parents read no images (their inputs: {', '.join(inputs)})")]
    texts = []
    for names, reason in cases:
        set_names = [name for name in names if getattr(options, name) != defaults[name]]
        if set_names:
            texts.append(f"{', '.join(option_hint(name) for name in set_names)} "
                         f"{'has' if len(set_names) == 1 else 'have'} no effect: {reason}")
    if options.independent_heads and not pairs_heads:
        texts.append(f"{option_hint('independent_heads')} has no effect: method {method} matches no units, so it "
                     "pairs no attention heads")
    if data_text := unread_data_warning(method, reads_data=reads_data, has_data=has_data, why=data_note):
        texts.append(data_text)
    if options.base is not None and not reads_base:
        advice = (f"drop it: the parents are not fine-tunes of it by their weights ({strangers})" if strangers
                  else "drop it, or pass a method that merges task vectors from it (e.g. method='ties')")
        texts.append(f"method {method} does not read the base ({option_hint('base')}): it changes no weight of the "
                     f"merge; {advice}")
    return texts


def unread_data_warning(method: str, *, reads_data: bool, has_data: bool, why: str | None = None) -> str | None:
    """Calibration data given to a merge in which nothing reads it (`inert_options_warnings`; advice:
    `advice_warnings`). `why`: the reason it goes unread, said instead of the advice to pass a method that reads it
    (`auto` took its dataless choice because its data method could not fit)."""
    if not has_data or reads_data:
        return None
    if why is not None:
        return f"the calibration data ({option_hint('calibration')}) has no effect: {why}"
    return (f"the calibration data ({option_hint('calibration')}) has no effect: method {method} reads none and no "
            "refit runs; drop it, or pass a method that reads it (e.g. method='regmean')")
