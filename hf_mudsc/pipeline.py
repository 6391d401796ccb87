"""`hf_mudsc.merge`: two parents -> checks -> calibration -> solve -> apply -> a stock PreTrainedModel."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from hf_mudsc._version import __version__
from hf_mudsc.apply.build import build_model, widened_config, with_stock_outputs
from hf_mudsc.apply.classifier import (
    aligned_to_parent_a,
    concatenated_classifier_config,
    concatenated_head,
    distinct_task_names,
    head_tasks,
    int_keyed_labels,
    label_ids,
    label_names,
    repeated_labels_message,
    same_head_labels,
    same_label_sets,
)
from hf_mudsc.apply.dtype import cast_merged, resolve_out_dtype
from hf_mudsc.apply.fidelity import parameters_digest, unscored_alpha_warning
from hf_mudsc.apply.refit import RefitReport, refit_model
from hf_mudsc.apply.repair import RepairReport, repair_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import correlations_from
from hf_mudsc.calibrate.device import resolve_device
from hf_mudsc.calibrate.layer_inputs import model_input_names
from hf_mudsc.diagnostics import (
    ADVICE,
    UNALIGNED_RELATIONS,
    advice_warnings,
    inert_options_warnings,
    merge_warnings,
    relation_warning,
    unread_data_warning,
    unread_options_warning,
)
from hf_mudsc.errors import CalibrationError, MergeInputError, OptionError, parent_label
from hf_mudsc.load.checks import REMOTE_CODE_CONFIG_KEYS, check_gradients_possible, check_parents, non_finite_refusal
from hf_mudsc.load.lazy import subset
from hf_mudsc.load.objects import claimed_for_merge, held_as_given, model_objects
from hf_mudsc.load.processors import (
    image_processor_differences,
    missing_part_warning,
    processor_fingerprint,
    processor_note,
    tokenizer_differences,
)
from hf_mudsc.load.references import (
    clean_token,
    display_name,
    is_object_reference,
    license_conflict,
    parent_name,
    pinned_calibration,
    pinned_reference,
)
from hf_mudsc.load.relation import (
    ParentRelation,
    base_is_a_parent,
    base_relations,
    check_parents_mergeable,
)
from hf_mudsc.methods.auto import (
    CHOICES,
    START_MATCHER,
    alpha_searched,
    check_choices,
    check_record,
    choose_method,
    confirm_choice,
    correspondence_checker,
    handed_options,
    is_auto,
    pending_reason,
    reference_compat_unread,
    refit_runs,
    units_correspond,
)
from hf_mudsc.methods.registry import (
    METHODS,
    MergeMethod,
    MethodContext,
    check_classifier,
    check_size,
    data_free_methods,
    get_method,
)
from hf_mudsc.option_values import AVERAGE_CHECK_METHOD, CHECK_NEEDS_NO_SOLVE, check_solved_by
from hf_mudsc.options import (
    AUTO,
    REFITTING,
    MergeOptions,
    flag,
    gate_tasks_text,
    known_keywords,
    option_hint,
    refit_read_options,
)
from hf_mudsc.plan import (
    MergePlan,
    base_copied,
    base_loaded_whole,
    check_filled_weights,
    check_memory,
    config_of,
    head_copies,
    memory_shortfall,
    memory_text,
    meta_model,
)
from hf_mudsc.progress import library_bars
from hf_mudsc.solve.diagnostics import MergeDiagnostics, compute_diagnostics
from hf_mudsc.solve.matchers import Match, share_in_place
from hf_mudsc.solve.widen import check_spend, measured_plan, unspent_stream_warning
from hf_mudsc.spec import PermutationSpec

if TYPE_CHECKING:
    from hf_mudsc.load.parents import LoadedParent

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What the merge did, for logs and the model card (attached to the merged model as `merge_report`).

    Attributes:
        method, matcher, alpha: the method that ran (what `auto` chose), its matcher and balance factor (None where
            the method reads none).
        group_names, group_values: the solve spec's unit groups and each one's final match value.
        objective_history, sweeps: the kept start's objective after each solve sweep, and how many sweeps it ran.
        starts, solve_start: each solve start's final objective, in the order they ran (docs/design.md §4.5), and
            the start whose solution was kept (`objective_history`, `sweeps` and `group_values` are that start's).
        num_samples: the calibration samples the statistics read.
        matches: one `Match` per spec group (None for a group left unmatched, e.g. by `average`): which original
            units of each parent were fused into each merged unit (`match.clusters()`).
        recipe: what `save_merged` / `push_merged` write as `mudsc_recipe.yaml`: the merge's inputs and options as
            recipe keys (parents pinned: `org/name@sha`, local folders absolute).
        processor: parent A's processor, saved beside the model.
        processor_given: a processor passed as `processor=` (not parent A's) preprocessed the calibration data: the
            recipe, whose re-run preprocesses with parent A's, says so.
        calibration_folders: the folders a calibration `Dataset` object was read from (its cache files), which no
            recipe can name: `save_merged` refuses an output there.
        refit: what `refit="ridge"` / `"gate"` did (layers, steps, time: a `RefitReport`) or `refit="repair"`
            (a `RepairReport`); None without a refit.
        refit_gate: with `refit="gate"`, both held-out scores and the decision (`apply.refit_gate.GateDecision`).
        warnings: why the merge may disappoint (`hf_mudsc.diagnostics`): logged, in `config.mudsc["warnings"]` and
            the card.
        auto_out_dtype: what `out_dtype="auto"` gives for these parents, (dtype, reason), whatever was asked (a
            recipe's re-run restates the reason its original recorded only when it still holds).
        weights_digest: a digest of the weights merge() returned (`apply.fidelity.parameters_digest`): a writer
            that finds other weights (trained or edited since) says so in what it writes.
        diagnostics: per-group match quality (activation, weight and blended correlation of the fused pairs), head
            pairings and sampled similarity blocks, for the plots (`plot(folder)`) and `hf-mudsc inspect`; None when
            no unit was matched.
    """

    method: str
    matcher: str | None
    alpha: float | None
    group_names: list[str] = field(default_factory=list)
    group_values: list[float] = field(default_factory=list)
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    starts: dict[str, float] = field(default_factory=dict)
    solve_start: str | None = None
    num_samples: int = 0
    matches: list[Match | None] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    processor: Any = None
    processor_given: bool = False
    calibration_folders: list[str] = field(default_factory=list)
    refit: RefitReport | RepairReport | None = None
    refit_gate: Any = None
    warnings: list[str] = field(default_factory=list)
    auto_out_dtype: tuple[str, str] | None = None
    weights_digest: str | None = None
    diagnostics: MergeDiagnostics | None = None

    def plot(self, path: str | os.PathLike, evaluation: Any = None) -> list[Path]:
        """Draw the merge's diagnostic PNGs into the folder `path` (created if needed) and return their paths:
        match quality per group, the solve objective, similarity heat maps, the attention-head pairing and, with
        `evaluation` (an `EvaluationResult` or its JSON dict), the accuracy bar chart (docs/design.md §8c)."""
        from hf_mudsc.publish.plots import draw_plots

        diagnostics = self.diagnostics.rounded() if self.diagnostics is not None else None
        return [plot.path for plot in draw_plots(path, diagnostics, evaluation)]


@dataclass(frozen=True)
class AutoChoice:
    """What `method="auto"` chose before the parents were loaded whole (`auto_before_loading`, on the parents opened
    for reading one tensor at a time): the method, why (the log, `config.mudsc["method_choice_reason"]` and the card
    say it), the parents' relation it was chosen from, and whether the parents after the first are then read one tensor
    at a time. A caller that loads the parents itself after choosing on them (the CLI) hands it to
    `merge(auto_choice=...)`, which then does not judge the parents' relation a second time — only for the parents it
    was chosen on (`parents`: their `LoadedParent.pinned_reference`s, in order; merge() refuses others)."""

    method: MergeMethod
    reason: str
    relation: ParentRelation
    streams: bool
    parents: tuple[str, ...]
    data_note: str | None = None
    """Why the calibration data goes unread when `auto` took its dataless choice for want of memory (`choose_auto`)."""
    base_links: tuple[ParentRelation, ...] = ()
    """How each parent relates to the base given, measured for the choice (`base_relations`; empty without a base, or
    when the base could not be read before loading): the merge reuses it rather than reading every tensor again."""


def solve_spec(spec: PermutationSpec, concatenate_classifier: bool, *, reference_rows: bool = False
               ) -> PermutationSpec:
    """The spec the solver matches with: the parents' spec, minus the classifier's weight similarity when the
    heads are concatenated.

    `reference_rows` (with `reference_compat=True`, when both classifiers have as many rows): keep the
    classifier in `C_w` as the reference implementation does for the paper's setting (task A = classes 0-4,
    task B = classes 5-9: row `j` of A and of B are stacked although they are different classes), so that
    its merged weights stay reproducible (docs/design.md §9).

    The classifier's columns are members of the residual (ViT) or pooler (BERT) group, and the weight
    similarity correlates each unit's row of `[Z_A; Z_B]` column by column — which assumes column `j` of A
    and of B mean the same thing. With different label sets (whatever their sizes) A's row `j` and B's row
    `j` are different classes, and with different counts the blocks do not even line up; so the classifier
    is then left out of `C_w` of its group (activations still see the features it reads, and apply still
    maps its columns into the merged space). Same label sets keep it, exactly as before.
    """
    if not concatenate_classifier or spec.classifier is None or reference_rows:
        return spec
    return spec.without_weight_similarity([spec.classifier.weight])


def _holding_given_objects(merge_function: Callable[..., Any]) -> Callable[..., Any]:
    """`merge` with the parents and the base given as model objects held as the merge needs them while it runs
    (eval mode, the caller's hooks set aside) and given back exactly as they were, also when it fails midway
    (`hf_mudsc.load.objects.held_as_given`); refused up front when another merge in this process holds one of them
    (`claimed_for_merge`). Run outside `torch.inference_mode()`: under it the merged model's parameters would be
    inference tensors, which cannot be trained (the weights are the same either way)."""

    @functools.wraps(merge_function)
    def held(*args: Any, **kwargs: Any) -> Any:
        models = args[0] if args else kwargs.get("models")
        given = list(models) if isinstance(models, Sequence) and not isinstance(models, (str, os.PathLike)) else []
        named = [(f"parent {parent_label(index)}", model) for index, item in enumerate(given)
                 for model in model_objects([item])]
        named += [("the base", model) for model in model_objects([kwargs.get("base")])]
        grad = torch.is_grad_enabled()  # the caller's (off under inference mode, as under no_grad): kept inside
        with (claimed_for_merge(named), torch.inference_mode(False), torch.set_grad_enabled(grad),
              held_as_given([model for _, model in named])):
            return merge_function(*args, **kwargs)

    return held


@_holding_given_objects
@known_keywords  # `merge(..., alpah=0.3)`: one line naming `alpha`, not Python's TypeError
def merge(
    models: Sequence[Any],
    calibration: Any = None,
    *,
    method: str = "auto",
    base: Any = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    normalize: bool | None = None,
    scaling: float = 1.0,
    rescale: bool = True,
    gamma: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    slerp_t: float | Sequence[float] = 0.5,
    consensus_k: int = 2,
    consensus_lambda: float = 0.6,
    pcb_ratio: float = 0.1,
    layer_swap: str | None = None,
    matcher: str = "zip",
    alpha: float | str = 0.5,
    num_samples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    zip_decay: float = 0.5,
    zip_budget: float = 1.0,
    independent_heads: bool = False,
    reference_compat: bool = False,
    progress: bool = True,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    statistics_dtype: str | torch.dtype = "float32",
    out_dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    processor: Any | None = None,
    auto_choice: AutoChoice | None = None,
    refit: str = "auto",
    refit_lambda: float = 1e-3,
    refit_norms: bool = False,
    refit_samples: int | str | None = "auto",
    regmean_scale: float = 0.95,
    fisher_epsilon: float = 1e-6,
    size: float = 1.0,
    size_spend: str = "mlp",
    dry_run: bool = False,
) -> PreTrainedModel | MergePlan | None:
    """Merge two or more fine-tuned models of one architecture into one model, without training.

    The options (everything but `models`, `calibration`, `progress`, `token`, `processor` and `auto_choice`) are
    declared with their checks in `hf_mudsc.options.MergeOptions`, which also gives the CLI flags and recipe keys.

    Args:
        models: N >= 2 parents of the same class and configuration: `PreTrainedModel`s, local folders,
            Hub ids `"org/name"` / `"org/name@revision"`, or `hf_mudsc.load.parents.LoadedParent`s. Every
            method takes any N but `average` and `slerp` (two); `reference_compat=True` takes two.
        calibration: data for the activation statistics — a `"repo_or_path[:config]:split"` spec (streamed
            with `datasets.load_dataset`), a `datasets.Dataset`/`IterableDataset` with model-input columns
            (`pixel_values`, `input_ids`/`attention_mask`) or raw columns (`image`/`img`, `text`/`sentence`,
            preprocessed with the parents' processor), a `hf_mudsc.calibrate.datasets.CalibrationStream`, or an iterable
            of dict batches. Read by `mudsc`, `zipit`, `activation_align`, `regmean`, `regmean_plusplus`, `fisher`,
            the refit and `alpha="auto"`; the other methods merge without it.
        method: `"auto"` (default) or a name from `hf_mudsc.METHODS` (`mudsc`, `zipit`, `activation_align`,
            `weight_matching`, `average`, `linear`, ...). `auto` chooses from the parents' relation
            (`hf_mudsc.methods.auto`): different initializations -> `mudsc`; fine-tunes of one base -> `regmean`
            with calibration data, else `ties` with `base`, else `linear`. The log,
            `config.mudsc["method_choice_reason"]` and the card say which and why.
        base: the parents' common base (a model, folder or `"org/name[@revision]"`), loaded and checked like a
            parent (same model type, configuration and tensor shapes; a folder or Hub id of another head class,
            e.g. a `BertForMaskedLM`, is read as the parents' class and what it lacks is merged as without a base).
            Methods that need one and are not given one use the `base_model` every parent's model card names.
        weights: one weight per parent, in parent order (mergekit's `weight`); None = 1 each.
        density: fraction of each task vector kept, in (0, 1], one number or one per parent (None: the method's).
        normalize: divide by the sum of the weights (None: the method's default, as mergekit's).
        scaling: factor on the merged task vector (mergekit's `lambda`).
        rescale: DARE/DELLA rescale the kept entries to keep each tensor's L1 norm.
        gamma, epsilon, slerp_t, consensus_k, consensus_lambda, pcb_ratio, layer_swap: parameters of one method
            each (breadcrumbs, della, slerp, consensus, pcb, layer_swap; docs/design.md §4.10), read only by it.
        matcher: `zip` or `align` for `mudsc` (the other methods fix their own).
        alpha: weight-similarity share of the dual-space similarity (MuDSC's balance factor), or `"auto"`: chosen
            without labels from the grid 0.1, 0.3, ..., 0.9 by the merges' fidelity to the parents on held-out
            calibration examples (every 5th; the statistics use the others), the curve recorded in
            `config.mudsc["alpha_auto"]` and the card (`hf_mudsc.apply.fidelity`).
        num_samples: calibration samples to use (all when None): from a dataset, chosen by a shuffle seeded with
            `seed` (a buffer shuffle when it streams); from batches given as they are, their first `num_samples`
            rows (the order the caller gave them in).
        batch_size: calibration batch size (examples per forward pass: speed against memory). The merged weights
            may differ in their last bits between batch sizes (the order of floating-point sums, ~1e-6), so
            `config.mudsc["batch_size"]` and the card record it. Batches given as they are (a list or iterable of
            dict batches) run as given: then it is not used, and recorded as None ("as given").
        seed: seeds the calibration subset, the random group order of the solve sweeps, the refit's subset
            (`refit_samples`) and the random masks of the dare_* and della* methods.
        zip_decay, zip_budget: ZipIt's α (similarity decay after a fusion) and β (same-model budget).
        independent_heads: pair q/k heads and v heads separately, as the reference implementation does.
        reference_compat: reproduce the reference implementation's merged weights (its `+1e-5` merge
            normaliser and independent head pairing).
        progress: show progress bars for calibration, the solve and the refit (False: no bar at all, transformers'
            loading and the Hub's download bars included). On a terminal they are tqdm bars; elsewhere, and when
            Hugging Face's bars are switched off (`HF_HUB_DISABLE_PROGRESS_BARS=1`,
            `huggingface_hub.utils.disable_progress_bars()`), INFO lines of the `hf_mudsc` logger.
        token: Hub token for private parents/datasets (default: the usual places; never logged).
        allow_pickle: load parents that only have pickle (`pytorch_model.bin`) weights — only if trusted.
        image_column, text_column: raw calibration columns to preprocess (default `image`/`img`,
            `text`/`sentence`).
        statistics_dtype: `"float32"` (default) multiplies each batch's mean-shifted activations in float32
            and sums the products in float64 — about twice as fast on CPUs, merged weights equal to the
            `"float64"` path to ~1e-6 on the test models (nearly tied units of a large model may pair
            differently); `"float64"` keeps every product in float64. A `torch.dtype` is accepted too.
        out_dtype: the dtype of the merged model's weights (the merge computes in float32 either way; the model is
            cast once at the end and its `config.dtype` set to match, so `save_pretrained` writes it and
            `from_pretrained(dtype="auto")` restores it). `"auto"` (default): the dtype every parent is stored in
            (safetensors headers; a model object's own parameters), float32 when they differ (logged);
            `"float32"`, `"float16"`, `"bfloat16"`, `"float64"` or a `torch.dtype`: that one. Recorded with its
            reason in `config.mudsc["out_dtype"]` / `["out_dtype_reason"]`, the card and the recipe (resolved).
        device: where the calibration forward passes and statistics products run: `"cpu"`, `"cuda"`,
            `"cuda:N"` or a `torch.device`; None = CUDA when available, else the CPU. Parents are read into
            CPU memory (as `from_pretrained` does), moved to the device for calibration and moved back;
            the solve's weight-similarity products run there too, while statistics sums, matching and the
            apply step stay on the CPU. The merged model is returned on `device` when one was given, on
            the CPU otherwise (like `from_pretrained`).
        refit: `"ridge"` refits every linear layer after the apply step, in forward order, by ridge least squares
            toward the parents' outputs mapped into the merged basis, on the calibration data (no labels, no
            gradients; docs/design.md §4.9): across initializations it closes most of the gap to the ensemble
            (toy digit ViTs: joint 31 -> 75, ensemble 78). `"none"`: the paper's merge. `"gate"`: ridge fitted on
            the calibration examples not held out (every 5th is), kept only if the merged model's held-out
            log-probability agreement with the parents is at least as good with it (`config.mudsc["refit_gate"]`;
            on real MiniLM pairs the refit can lose: docs/benchmarks/refit_text.md). `"auto"` (default): gate for
            a unit-matching method (mudsc, zipit, ...) and after regmean / regmean_plusplus / fisher of equally
            weighted parents, given re-readable calibration data; none for the others and under
            `reference_compat=True`. `"ridge"` and `"gate"` need calibration data, also for `average`; they read
            the data once per layer step (not a one-shot iterator). Under `torchrun` it runs on the main process.
            `"repair"` (REPAIR, `hf_mudsc.apply.repair`): only rescales each unit of every linear layer and LayerNorm
            so its mean and std on the calibration data are the parents' (its fused units' merge-weighted mean); no
            Gram matrices, a smaller gain than ridge on the toys (docs/benchmarks/repair.md); needs calibration data.
        refit_lambda: the refit's ridge strength relative to each layer's mean input energy (pulls toward the
            matched weights).
        refit_norms: with the ridge refit (`"ridge"`, `"gate"`, `"auto"`), also refit every LayerNorm's weight and
            bias per unit, in forward order with the linear layers, toward the parents' LayerNorm outputs mapped
            into the merged basis (off by default: docs/benchmarks/refit_layernorm.md).
        refit_samples: calibration examples the refit reads, chosen by a shuffle seeded with `seed` (None: all, CLI
            `--refit-samples all`;
            `"auto"`, the default: 16 token rows per unknown of the widest per-token layer, 128 to 1024 examples;
            the count used is recorded as `config.mudsc["refit_examples"]`).
        regmean_scale: `regmean` / `regmean_plusplus`: factor on the off-diagonal entries of every input Gram
            matrix, in [0, 1] (docs/design.md §4.11).
        fisher_epsilon: `fisher`: floor on every parent's diagonal Fisher, > 0.
        size: the size budget of the unit-matching methods, in [1, 2]: the merged model may hold up to `size` times
            one parent's parameters (heads included, counted exactly). The extra keeps the MLP units whose best
            cross-parent match is weakest unfused — a wider `intermediate_size`, still the parents' stock class
            (docs/design.md §4.12); `config.mudsc["size_budget"]` records the widths and the parameter count.
            1.0 (default) is the paper's merge; the other methods keep one parent's shape and refuse other values.
        size_spend: where the budget goes: `"mlp"` (default) as above; `"heads"` first leaves the weakest-matched
            attention head pairs of every block and as many residual-stream units unfused (`hidden_size` and
            `num_attention_heads` grow by whole heads, ViT only, two parents), `"residual"` first leaves residual-stream
            units unfused (`hidden_size` grows, the config pins `head_dim`; ViT only, two parents); both spend the rest
            on MLP units.
        dry_run: return a `hf_mudsc.plan.MergePlan` instead of merging: the parents' pinned revisions, their
            relation as far as configs tell, the method, the groups and widths, the calibration rows and an
            estimate of time and peak memory — from configs and safetensors headers only (no weights downloaded,
            nothing written).
        processor: preprocesses raw calibration columns (a tokenizer, image processor or processor) instead of
            the parents' own — which are found in their folders, or for model objects in their `name_or_path`
            folder or cached Hub snapshot.
        auto_choice: with `method="auto"` and parents the caller loaded itself (`LoadedParent`s from
            `load_parents_and_base(choose_loading=...)`), the `AutoChoice` `auto_before_loading` made on those parents:
            merged with it instead of judging their relation again (what the CLI does). None: `auto` chooses here.

    Returns:
        A `PreTrainedModel` of the parents' transformers class (a user's subclass of one gives that class, as
        `from_pretrained` reloads it); `save_pretrained`/`push_to_hub` work as usual.
        When the parents' label sets differ, the classifier is A's classes then B's (then C's ...) and
        `config.task_label_ranges` maps each task to its slice. Under `torchrun`/`accelerate launch`
        every process computes its share of the calibration statistics; only the main process
        (`hf_mudsc.calibrate.distributed.is_main_process()`) solves and gets the model, the others get None.
        With `dry_run=True`, a `hf_mudsc.plan.MergePlan` instead (nothing merged, downloaded or written).
    """
    # Every option, before anything is loaded (the same checks as a recipe and the CLI): the keyword arguments
    # above that `MergeOptions` declares (tests/test_options_agree.py keeps the two lists equal).
    keywords = {name: value for name, value in locals().items() if name in MergeOptions.names(keyword=True)}
    try:
        merge_options = MergeOptions.from_keywords(**keywords)
        # (the parents' count when `models` is a list of them; anything else is refused below)
        merge_options.check_combination(parents=len(models) if isinstance(models, Sequence) and not isinstance(
            models, (str, os.PathLike, PreTrainedModel)) else None)
        token = clean_token(token)
    except OptionError as error:
        raise MergeInputError(str(error)) from None
    alpha, statistics_dtype = merge_options.alpha, merge_options.statistics_dtype
    if not isinstance(models, Sequence) or isinstance(models, (str, os.PathLike, PreTrainedModel)) or len(models) < 2:
        if isinstance(models, (str, os.PathLike)):
            given = repr(str(models))
        elif isinstance(models, Sequence):
            given = f"a list of {len(models)} parent{'' if len(models) == 1 else 's'}"
        else:
            given = type(models).__name__
        raise MergeInputError(f"merge takes a list of two or more parents (Hub ids, folders or models), got {given}")
    count = len(models)
    automatic = is_auto(method)
    if auto_choice is not None and not automatic:
        raise MergeInputError(f"auto_choice is the choice of method 'auto' (pipeline.auto_before_loading); pass it "
                              f"with method='auto', not method={method!r}, or leave it out")
    if auto_choice is not None:
        _check_choice_parents(auto_choice, models)
    merge_method = None if automatic else get_method(method)
    if merge_method is not None:
        _check_parent_count(merge_method, count)
    _check_per_parent_options(merge_options, count)
    if merge_method is not None:
        merge_method.check_options(merge_options, count)
        check_size(merge_method, merge_options.size)
    else:  # `auto`: refused at once when every method it may choose refuses these options
        check_choices(merge_options, count, has_data=calibration is not None, has_base=base is not None)
    try:
        run_device = resolve_device(device)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    from hf_mudsc.calibrate.dataset_spec import spec_text
    from hf_mudsc.calibrate.datasets import (
        CALIBRATION,
        CalibrationStream,
        SamePasses,
        dataset_folders,
        given_processor_role,
        load_calibration_dataset,
        pin_calibration_revision,
        resolve_calibration,
        same_passes,
    )
    from hf_mudsc.calibrate.distributed import collect_statistics_distributed, is_main_process
    from hf_mudsc.load.parents import dtype_description, load_parents_and_base, parameters_of

    # "auto" is resolved once the method is known (resolve_refit); `refit_value` is the resolved refit.
    refit_value = merge_options.refit
    refitting = refit_value in REFITTING
    if refitting and calibration is None:
        raise MergeInputError(f"refit={refit!r} needs calibration data (a 'dataset:split' spec, a datasets.Dataset "
                              "or a list of input batches); pass calibration, or refit='none' (CLI: --refit none)")
    if refitting and isinstance(calibration, Iterator):
        raise MergeInputError(f"refit={refit!r} reads the calibration data once per layer step, so it cannot be a "
                              "one-shot iterator; pass a list of batches or a datasets.Dataset")
    if merge_method is not None:
        _check_data(merge_method, calibration, count)
        _check_alpha_data(merge_method, merge_options, calibration, count)
        refit_value = _refits(merge_options, merge_method, calibration, count)
        refitting = refit_value in REFITTING
    if dry_run:
        from hf_mudsc.plan import plan_merge

        return plan_merge(models, calibration, merge_options, token=token,
                          streams=lambda planned: streams_parents(planned, merge_options, calibration, count),
                          check_columns=lambda data, processors, model_a: check_calibration_before_weights(
                              data, processors, model_a, merge_options, given=processor))
    # `auto` opens the calibration data it was given: the method it chooses may read it.
    needs_data = calibration is not None if merge_method is None else _reads_data(merge_method, refitting)
    given_calibration_name = _calibration_name(calibration) if calibration is not None else None
    calibration_folders = dataset_folders(calibration)  # a Dataset object's folder: no output may go there
    calibration_spec = None
    if needs_data and isinstance(calibration, (str, os.PathLike)):
        # A Hub dataset is pinned to its commit (the recipe records it) and read at that commit; a spec that
        # does not exist fails here, before any parent weights are downloaded.
        # Read as given (messages echo what was typed, `./data`), recorded with a local path made absolute.
        pinned = pin_calibration_revision(spec_text(calibration), token=token)
        calibration_spec = pinned_calibration(pinned)
        calibration = load_calibration_dataset(pinned, token=token)
    # A tensor-wise method reads each parent's tensor only while merging it: parents after the first and the base
    # are then read from their safetensors files one tensor at a time (docs/design.md §4.10, streaming).
    streaming = auto_choice.streams if auto_choice is not None else streams_parents(
        merge_method, merge_options, calibration, count)
    # Parents given as references are read here: whole, unless streamed (then the first one only).
    references = sum(isinstance(m, (str, os.PathLike)) for m in models)
    first: dict[str, Any] = {}  # the first parent's config (or model), for the calibration check below

    def check_config(config: Any, every: list[Any], found_base: Any) -> None:
        first["config"] = config
        check_before_weights(config, merge_options, count, merge_method,
                             loading=min(references, 1) if streaming else references,
                             copied=head_copies(every, streaming=streaming),
                             base=base_loaded_whole(base, merge_method, streaming=streaming),
                             base_copy=base_copied(found_base, every[0], streaming=streaming), parents=every)

    def check_data(processors: list[Any], problems: Sequence[str | None] = ()) -> None:
        # a method known to read the data, or `auto` given data (every method it may choose that reads data reads
        # the same columns): the columns, before weights
        if needs_data and "config" in first:
            check_calibration_before_weights(calibration, processors, first["config"], merge_options,
                                             given=processor, unreadable=problems)

    early = [auto_choice] if auto_choice is not None else []  # `auto`'s choice when made before loading

    def choose_loading(views: list[LoadedParent], found_base: Any, base_view: LoadedParent | None) -> bool:
        early.append(auto_before_loading(views, merge_options, calibration, has_base=found_base is not None,
                                         references=references, processor=processor, base=base,
                                         found_base=found_base, base_view=base_view))
        return early[-1].streams

    with library_bars(progress):
        parents, base_parent, base_source = load_parents_and_base(
            list(models), base, token=token, allow_pickle=allow_pickle,
            base_needed_for=method if merge_method is not None and merge_method.needs_base_model else None,
            lazy=streaming, check_config=check_config, before_weights=check_data,
            choose_loading=choose_loading if merge_method is None and not early else None)
    loaded = [p.model for p in parents]
    model_a = loaded[0]
    for index, other in enumerate(loaded[1:], start=1):
        check_parents(model_a, other, labels=(parent_label(0), parent_label(index)))
    if merge_method is not None and merge_method.needs_gradients:
        check_gradients_possible([(f"parent {parent_label(i)}", m) for i, m in enumerate(loaded)], merge_method.name)
    spec = spec_for(model_a)
    check_spend(spec, merge_options.size, merge_options.size_spend)
    # A's labels in another order: from here on that parent is a copy saved in A's label order (docs/design.md §6).
    parents, head_reordered = _aligned_heads(parents, spec)
    loaded = [p.model for p in parents]
    # parents of different label sets: the merged head is their heads side by side (docs/design.md §6)
    concatenate = spec.classifier is not None and not same_label_sets([m.config for m in loaded])
    base_parent = _aligned_base(base_parent, model_a.config, spec)
    for other in loaded[1:]:
        spec_for(other)
    # An object whose folder no longer holds its weights is named as the recipe names it, not by that folder (one
    # that names no folder keeps its letter's name).
    parent_names = [p.repo_id or (p.reference if is_object_reference(p.reference) and parent_name(p.model, "")
                                  else parent_name(p.model, f"model_{parent_label(i).lower()}"))
                    for i, p in enumerate(parents)]
    # The merged model's dtype: the parents' as stored (they were loaded as float32) unless one is asked for.
    stored_dtypes = [p.stored_dtype or dtype_description(t.dtype for t in p.model.parameters()) for p in parents]
    labels_and_objects = ([parent_label(i) for i in range(count)], [p.from_object for p in parents])
    out_dtype, out_dtype_reason = resolve_out_dtype(merge_options.out_dtype, stored_dtypes, *labels_and_objects)
    auto_out_dtype = resolve_out_dtype(AUTO, stored_dtypes, *labels_and_objects)
    # A protected parent is refused here, before calibration and before anything is written or pushed.
    # The solve and apply run on the CPU (no copy for parents already there); lazily read parents stay lazy.
    params = [parameters_of(p) for p in parents]
    # NaN/inf weights are refused by the relation check, which reads every tensor anyway (`relation.parent_relation`)
    # `auto` that chose before loading judged these same (aligned) parents, read one tensor at a time
    relation = early[0].relation if early else check_parents_mergeable(params, spec, parent_names)
    base_params = None
    base_links: list[ParentRelation] = []  # how each parent relates to the base
    if base_parent is not None:
        base_params = _check_base(base_parent, model_a, spec, merge_options.weights, concatenated_head=concatenate)
        # the relations `auto` chose by, when it chose before loading: every tensor of the base and parents read once
        base_links = (list(early[0].base_links) if early and early[0].base_links
                      else base_relations(base_params, params, spec))
    strangers = not_fine_tunes(base_links)
    choice_reason = None
    # `auto`'s same-base choice, while the unit-matching solve that confirms it runs (methods.auto): (the same-base
    # method, its reason); the merge runs as that solve's method until the solve decides.
    unconfirmed: tuple[MergeMethod, str] | None = None
    data_note = None  # why the data goes unread, when auto's data method could not fit
    chosen_by_auto = merge_method is None
    if chosen_by_auto:
        if early:  # chosen, and its memory checked, before any parent was loaded whole
            merge_method, choice_reason, data_note = early[0].method, early[0].reason, early[0].data_note
        else:
            merge_method, choice_reason, data_note = choose_auto(
                relation, merge_options, calibration, count, has_base=base_parent is not None,
                shortfall=lambda method: memory_shortfall(model_a, count, method, loading=0), strangers=strangers)
            check_memory(model_a, count, merge_method, loading=0, chosen=choice_reason)  # before calibration
    if base_parent is not None:
        check_base_not_a_parent(base_parent.repo_id or base_parent.reference, base_links, merge_method)
        _log_base_relations(base_parent, base_links, unused=not merge_method.needs_base_model)
    if chosen_by_auto:
        # Two parents: the solve's merge is the merge if the units moved. More: one pair is solved first (parent A
        # and the parent farthest from it by weight distance), as every pair would multiply the check's cost.
        checker = _correspondence_checker(relation, merge_method, merge_options, calibration, count)
        if checker is not None and _fits_in_memory(model_a, min(count, 2), checker, merge_method):
            logger.info("method auto: %s's unit matching runs first, to confirm that the units correspond: its "
                        "activation-only zip start, then its solve unless that start leaves most units in place "
                        "(method=%r, CLI: %s %s, skips it)", checker.name, merge_method.name, flag("method"),
                        merge_method.name)
            unconfirmed = (merge_method, choice_reason)
            if count == 2:
                merge_method = checker
        refit_value = _refits(merge_options, merge_method, calibration, count)
        refitting = refit_value in REFITTING
        needs_data = _reads_data(merge_method, refitting)
    if (merge_method.needs_data and isinstance(calibration, Iterator)):
        raise MergeInputError(_one_shot_refusal(merge_method, choice_reason, relation.relation))
    # Options as the method reads them: `weights` one per parent (1 each when not given).
    # `alpha="auto"` hands the method 0.5 until the search below sets each candidate.
    method_options = handed_options(merge_options, count)
    # ... and the weights a refit reads after a method that does not (`refit_read_options`)
    used_options = refit_read_options(merge_method.used_options(method_options), merge_options, refit_value)
    option_warnings: list[str] = []  # options that change nothing, said for the method that finally merges
    if unconfirmed is None:  # (else once the solve has decided the method)
        option_warnings = _warn_unused(merge_options, used_options, merge_method, calibration, count, refit_value,
                                       spec.inputs, data_note=data_note, strangers=strangers)
    calibration_name = given_calibration_name if needs_data else None
    # alpha="auto" (docs/design.md §4.4): only for a method that matches units on activations and reads α.
    auto_alpha = alpha_searched(merge_method, merge_options, count)
    _check_alpha_data(merge_method, merge_options, calibration, count)  # `auto`'s choice, now known

    accumulators = None
    if needs_data:
        calibration = resolve_calibration(
            calibration, processor if processor is not None else [p.processor for p in parents],
            image_column=image_column, text_column=text_column,
            num_samples=num_samples, seed=seed, inputs=spec.inputs or None, model_config=model_a.config,
            token=token, max_tokens=spec.max_tokens,
            role=given_processor_role(processor) if processor is not None else CALIBRATION,
        )
        # A loader that reshuffles each pass would pair one pass's outputs with another's inputs: refused, and
        # before any work when the merge is known to read the data again (its own passes, a refit, alpha="auto").
        calibration = same_passes(calibration)
        if isinstance(calibration, SamePasses) and (merge_method.needs_data or refit_value in REFITTING
                                                    or auto_alpha or unconfirmed is not None):
            calibration.check_now()

    # Every pass over the data checks each batch against the parents' config first; what it warns of is said once
    # per merge and joins the merge's warnings (ids past the vocabulary, images of another shape are refused).
    from hf_mudsc.calibrate.statistics import ModelInputCheck

    input_check = ModelInputCheck.of(
        model_a.config, preprocessed=calibration.made_inputs if isinstance(calibration, CalibrationStream) else ())

    def calibration_batches() -> Iterator[dict]:
        """A fresh pass over the (resolved) calibration data, as every step that reads it again reads it."""
        from hf_mudsc.calibrate.statistics import iter_batches

        return iter_batches(calibration, batch_size=batch_size, num_samples=num_samples,
                            columns=_input_columns(model_a), required=spec.inputs, max_tokens=spec.max_tokens,
                            check=input_check)

    def settled(method: MergeMethod) -> tuple[str, bool, dict[str, Any], bool]:
        """What follows from the method once `auto`'s check has decided it: the refit it runs, whether that reads
        the data, the options it reads, and whether alpha="auto" searches."""
        refit = _refits(merge_options, method, calibration, count)
        used = refit_read_options(method.used_options(method_options), merge_options, refit)
        return (refit, refit in REFITTING, used,
                alpha_searched(method, merge_options, count))

    correspondence = None  # the solve that confirmed or overturned auto's same-base choice (config.mudsc)
    pair_overturned = False  # (3+ parents) the pair's solve moved most units: the solve over every parent decides
    short_said = False  # whether the data holding fewer samples than `num_samples` asked for was said
    if unconfirmed is not None and count > 2:
        pair = (0, relation.farthest)
        pair_name = f"parents {parent_label(pair[0])} and {parent_label(pair[1])}"
        in_place, examples, first_start = _pair_in_place(
            checker, [loaded[i] for i in pair], [params[i] for i in pair], spec, calibration,
            options=method_options, batch_size=batch_size, num_samples=num_samples,
            statistics_dtype=statistics_dtype, device=run_device, progress=progress, check=input_check)
        _log_sample_count(examples, _check_pass(checker, pair_name))
        short_said = _warn_short(num_samples, examples)
        same_base, pending = unconfirmed
        merge_method, choice_reason = confirm_choice(same_base, pending, checker, in_place,
                                                     relation.weight_distance, pair=pair_name,
                                                     first_start=first_start)
        correspondence = check_record(checker, [parent_label(i) for i in pair], in_place, first_start=first_start)
        logger.info("method auto: %s", choice_reason)
        unconfirmed = None
        if merge_method is checker:
            # The pair's solve is a cheap proxy: the solve over every parent, which merges, decides again by the
            # same rule, as two parents' solve does (a pair near a tie between its starts can judge otherwise).
            said, name = pending.rsplit("): ", 1)
            overturned = (f"{said}; {checker.name}'s solve of {pair_name} leaves {in_place:.1%} of their units in "
                          "place, so it solves every parent")
            unconfirmed = (same_base, f"{overturned}): {name}")
            pair_overturned = True
            # Only the pair's memory was checked (`_fits_in_memory`); every parent's statistics grow with N².
            check_memory(model_a, count, checker, loading=0, chosen=f"{overturned})")
        refit_value, refitting, used_options, auto_alpha = settled(merge_method)
        if unconfirmed is None:  # (else once the solve over every parent has decided the method)
            option_warnings = _warn_unused(merge_options, used_options, merge_method, calibration, count,
                                           refit_value, spec.inputs, data_note=data_note, strangers=strangers)
    held_out = alpha_scorer = None
    statistics_data, statistics_samples = calibration, num_samples
    if auto_alpha:  # every 5th example is held out to score the candidate merges; the rest feed the statistics
        from hf_mudsc.apply.fidelity import holdout_split

        statistics_data, held_out = holdout_split(calibration_batches)
        statistics_samples = None
    if merge_method.needs_calibration:
        accumulators = collect_statistics_distributed(
            loaded[0], loaded[1], spec, statistics_data, batch_size=batch_size, num_samples=statistics_samples,
            columns=_input_columns(model_a), required=spec.inputs, progress=progress,
            statistics_dtype=statistics_dtype, device=run_device, others=loaded[2:], check=input_check,
        )
    if not is_main_process():
        if accumulators is not None:
            logger.info("statistics shared with the main process, which solves and builds the merged model")
        else:  # the method's own data passes (regmean, fisher) are not sharded: this process had nothing to do
            logger.info("method %s reads its calibration data on the main process alone; this process had no share "
                        "of the work", merge_method.name)
        return None

    report = MergeReport(method=merge_method.name, matcher=used_options.get("matcher"),
                         alpha=used_options.get("alpha"))
    head = [n for n in (spec.classifier.weight, spec.classifier.bias) if n] if spec.classifier else []
    correlations = None
    rows = None  # calibration rows (examples x tokens) each group saw, for the size warning
    repeats = None  # (examples, repeats of earlier ones) the statistics read, for the repeated-examples warning
    calibration_examples = None  # examples the calibration stream holds, when the statistics counted them
    if accumulators is not None:
        # The stream's size for the refit's seeded subset — not when the statistics read it without the α search's
        # held-out examples (then `subset_batches` counts the whole stream itself).
        calibration_examples = (accumulators[0].examples or None) if held_out is None else None
        rows = {g.name: accumulator.count for g, accumulator in zip(spec.groups, accumulators)}
        repeats = (accumulators[0].examples, accumulators[0].repeats)
        report.num_samples = accumulators[0].examples or accumulators[0].count
        # The statistics of auto's check are named so: the same-base method may then read the data again.
        _log_sample_count(report.num_samples, _check_pass(merge_method) if unconfirmed is not None
                          else f"{merge_method.name}'s statistics", held_out=held_out is not None)
        if held_out is None:  # else the held-out rows are counted once the search has read them
            short_said = short_said or _warn_short(num_samples, report.num_samples)
        # reference_compat reproduces the reference's statistics: constant units keep Pearson's 0 there.
        correlations = correlations_from(accumulators, constants=not reference_compat)
    batches = calibration_batches if needs_data else None
    reference_rows = (reference_compat and spec.classifier is not None and count == 2
                      and params[0][spec.classifier.weight].shape == params[1][spec.classifier.weight].shape)
    matching_spec = solve_spec(spec, concatenate, reference_rows=reference_rows)

    def context_for(method: MergeMethod, options: MergeOptions | None = None) -> tuple[MethodContext, set[str]]:
        """The method's context (`options`: the method's options, default `method_options`), and the head tensors
        left out of it: heads of different label sets are concatenated here unless the method builds them (the
        unit-matching apply step)."""
        left = set(head) if concatenate and not method.builds_concatenated_head else set()
        return MethodContext(
            spec=spec, solve_spec=matching_spec,
            parents=[_without(p, left) for p in params],
            base=None if base_params is None else _without(base_params, left),
            models=loaded, batches=batches, correlations=correlations, concatenate_classifier=concatenate,
            options=method_options if options is None else options, device=str(run_device), progress=progress,
            relation=relation.relation,
        ), left

    def whole_parameters(computed: Mapping[str, torch.Tensor], left: set[str]) -> dict[str, torch.Tensor]:
        """A method's merged tensors made a whole model's: the heads it left out concatenated, the tensors a base
        lacked filled with the parents' weighted mean."""
        whole = dict(computed)
        if left:
            whole.update(concatenated_head(params, sorted(left)))
        _fill_missing(whole, params, method_options.weights)
        return whole

    context, left_out = context_for(merge_method)
    alpha_curve = None
    if unconfirmed is not None:
        # The solve's first start decides alone when it already leaves most units in place (methods.auto); else
        # the solve runs, at the α handed (alpha="auto" searches once decided), and its merge is kept if it wins.
        # After a pair's solve moved most units, the solve over every parent decides (as the reason says).
        start_share = None if pair_overturned else _start_decides(merge_method, context)
        first_start = start_share is not None
        result = None if first_start else merge_method.merge_parameters(context)
        in_place = start_share if result is None else share_in_place(result.matches)
        final, choice_reason = confirm_choice(*unconfirmed, merge_method, in_place, relation.weight_distance,
                                              pair=f"all {count} parents" if count > 2 else "",
                                              first_start=first_start)
        correspondence = check_record(merge_method, [parent_label(i) for i in range(count)], in_place,
                                      first_start=first_start)
        logger.info("method auto: %s", choice_reason)
        if final is not merge_method:  # the units correspond: the same-base method merges, without the statistics
            merge_method = final
            refit_value, refitting, used_options, auto_alpha = settled(merge_method)
            accumulators = correlations = rows = calibration_examples = repeats = None
            report = MergeReport(method=merge_method.name, matcher=used_options.get("matcher"),
                                 alpha=used_options.get("alpha"))
            context, left_out = context_for(merge_method)
            del result  # the solve's merged weights (if it ran) are not held while the same-base method runs
            result = merge_method.merge_parameters(context)
        option_warnings = _warn_unused(merge_options, used_options, merge_method, calibration, count, refit_value,
                                       spec.inputs, data_note=data_note, strangers=strangers)
    # the concatenated head's tasks (size, parent), for the held-out scores: a merged parent holds several
    task_sizes, task_parents = head_tasks([m.config for m in loaded], [
        p[spec.classifier.weight].shape[0] for p in params]) if concatenate else (None, None)
    if auto_alpha:
        from hf_mudsc.apply.fidelity import FidelityScorer, search_alpha

        head_config = copy.deepcopy(model_a.config)
        if concatenate:
            for key, value in concatenated_classifier_config(
                [m.config for m in loaded], distinct_task_names([m.config for m in loaded])
            ).items():
                setattr(head_config, key, value)
        alpha_scorer = FidelityScorer(loaded, held_out, mask_key="attention_mask", task_sizes=task_sizes,
                                      task_parents=task_parents)
        short_said = short_said or _warn_short(num_samples, report.num_samples + alpha_scorer.examples)
        chosen_alpha, result, alpha_curve = search_alpha(
            merge_method, context, alpha_scorer,
            lambda parameters: build_model(model_a, widened_config(copy.deepcopy(head_config), spec, parameters),
                                           parameters))
        report.alpha = chosen_alpha
        used_options = {**used_options, "alpha": chosen_alpha}
    elif unconfirmed is None:
        result = merge_method.merge_parameters(context)
    report.matches = list(result.matches)
    report.group_names = list(result.group_names)
    report.group_values = list(result.group_values)
    report.objective_history = list(result.objective_history)
    report.sweeps = result.sweeps
    report.starts = dict(result.start_objectives)
    report.solve_start = result.solve_start
    if result.calibration_examples:  # a method that read the calibration data itself (`needs_data`)
        report.num_samples = result.calibration_examples
        _log_sample_count(report.num_samples, f"{merge_method.name}'s own pass")
        short_said = short_said or _warn_short(num_samples, report.num_samples)  # once: the check read the same data
    merged_params = whole_parameters(result.parameters, left_out)
    relation_text = relation_warning(
        relation.relation, merge_method, refitting=refit_value in ("ridge", "gate"), gated=refit_value == "gate",
        units_correspond=units_correspond(share_in_place(report.matches))) if relation.relation else None
    reads = model_input_names(parents[0].model)  # a tokenizer's input the merged model never takes is no difference

    def warnings_for(method: MergeMethod, **found: Any) -> list[str]:
        """`merge_warnings` for this merge's parents and data, by `method` with what its merge `found`; then the
        part parent A's processor lacks, if any (`missing_part_warning`)."""
        said = merge_warnings(
            relation=relation.relation, method=method, widths={g.name: g.width for g in spec.groups}, parents=count,
            processor_differences=image_processor_differences([p.processor for p in parents]),
            tokenizer_differences=tokenizer_differences([p.processor for p in parents], reads),
            repeats=repeats, **found)
        missing = missing_part_warning([p.processor for p in parents], spec.inputs)
        return [*said, missing] if missing else said

    report.warnings = warnings_for(
        merge_method, group_names=report.group_names, group_values=report.group_values, rows=rows,
        relation_text=relation_text,
        shared_labels=[label_names(m.config) for m in loaded] if spec.classifier is not None and not concatenate
        else None)
    if alpha_curve is not None and not alpha_curve["held_out_examples"]:
        report.warnings.append(unscored_alpha_warning(alpha_curve["chosen"]))
    size_plan = measured_plan(spec, params, merged_params, merge_options.size) if merge_method.supports_size else None
    if size_plan is not None and (unspent := unspent_stream_warning(spec, size_plan, merge_options.size_spend)):
        report.warnings.append(unspent)
    advice = advice_warnings(relation.relation, relation_text, None)
    for text in report.warnings:
        logger.warning("%s", text, extra={ADVICE: text in advice})
    report.warnings += [text for text in option_warnings + input_check.warnings
                        if text not in report.warnings]  # logged when found
    if count == 2:  # the diagnostics describe a two-parent unit matching (None when no unit was matched)
        report.diagnostics = compute_diagnostics(
            matching_spec, params[0], params[1], report.matches, correlations, alpha=result.similarity_alpha,
            method=merge_method.name, matcher=used_options.get("matcher"), group_values=report.group_values,
            objective_history=report.objective_history, sweeps=report.sweeps, starts=report.starts,
            solve_start=report.solve_start, solved_matches=result.solved_matches)
        if report.diagnostics is not None and alpha_curve is not None:
            report.diagnostics.alpha_curve = alpha_curve

    config = with_stock_outputs(copy.deepcopy(model_a.config))
    for key in REMOTE_CODE_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    if concatenate:
        configs = [m.config for m in loaded]
        for key, value in concatenated_classifier_config(configs, distinct_task_names(configs)).items():
            setattr(config, key, value)
    elif spec.classifier is not None:  # parent A's labels: label2id written from its id2label, not copied
        config.id2label = int_keyed_labels(config)
        config.label2id = label_ids(config)
    # What the merge used, for each option declared `recorded`: the per-method options as the method reports them
    # (None where it does not read them), the others as given.
    used = dataclasses.replace(
        merge_options, **{**dict.fromkeys(MergeOptions.names(per_method=True)), **used_options},
        method=merge_method.name, calibration=calibration_name,
        base=None if base_parent is None else (base_parent.repo_id or parent_name(base_parent.model, "base")),
        independent_heads=bool(independent_heads or reference_compat), reference_compat=bool(reference_compat),
        statistics_dtype=statistics_dtype if merge_method.needs_calibration else None,
        refit=refit_value if refitting else "none",
        refit_lambda=merge_options.refit_lambda if refit_value in ("ridge", "gate") else None,
        refit_norms=merge_options.refit_norms if refit_value in ("ridge", "gate") else None,
        refit_samples=merge_options.refit_samples if refitting else None, out_dtype=out_dtype)
    config.mudsc = {
        "library": "hf_mudsc",
        "version": __version__,
        **used.values(recorded=True),
        "method_choice_reason": choice_reason,
        "base_revision": None if base_parent is None else base_parent.commit_sha,
        "base_source": base_source,
        "parents": parent_names,
        # parent i's head reordered to parent A's label order before the merge (A's labels in another order)
        "head_reordered": head_reordered,
        "parent_revisions": [p.commit_sha for p in parents],
        # the licences the parents' (and the base's) model cards declare: the card declares one only if all share it
        "parent_licenses": [p.license for p in parents],
        "base_license": None if base_parent is None else base_parent.license,
        "num_calibration_samples": report.num_samples,
        # batches given as they are run one forward each, as given: no batch size of ours was used
        **({"batch_size": None} if calibration is not None and not isinstance(calibration, CalibrationStream)
           else {}),
        "refit_examples": None,  # the examples the refit read (refit_samples resolved), set once it ran
        "refit_gate": None,  # refit="gate": both held-out scores and whether the refit was kept (apply.refit_gate)
        "group_match_values": {n: round(float(v), 6) for n, v in zip(report.group_names, report.group_values)},
        "solve_start": report.solve_start,
        "start_objectives": {name: round(float(v), 6) for name, v in report.starts.items()},
        "parent_relation": relation.as_config(),
        # `auto`'s same-base choice confirmed on the activations: the solve's method, the share of units it left in
        # place and whether the units correspond (methods.auto.confirm_choice); None when no check ran.
        "correspondence_check": correspondence,
        "warnings": list(report.warnings),
        # parent A has no processor (none is saved) but the merge had one: whose, and whether it preprocessed raw data
        "processor_note": processor_note([p.processor for p in parents], processor, preprocessed=needs_data and getattr(
            calibration, "preprocess", None) is not None),
        "alpha_auto": alpha_curve,  # the α search's curve (alpha="auto"), else None
        "out_dtype_reason": out_dtype_reason,  # why the merged weights have the dtype `out_dtype`
        # The size budget's widths and exact parameter count (docs/design.md §4.12); None for methods without one.
        "size_budget": size_plan.as_config() if size_plan is not None else None,
    }
    widened_config(config, spec, merged_params)
    config._name_or_path = ""
    merged = build_model(model_a, config, merged_params)
    recipe_normalize = merge_options.normalize  # as given, unless the averaging check returned its average
    if refit_value == "repair":
        report.refit = repair_model(
            merged, loaded, spec, report.matches, calibration_batches,
            weights=merge_options.weights, samples=merge_options.refit_samples, seed=seed, total=calibration_examples,
            device=run_device, progress=progress)
        merged.config.mudsc["repair"] = {"scope": report.refit.scope, "layers": len(report.refit.layers)}
    elif refitting:
        def run_refit(model: Any, data: Callable[[], Iterable[Mapping[str, Any]]], total: int | None) -> Any:
            return refit_model(
                model, loaded, spec, report.matches, data, concatenate_classifier=concatenate,
                lambda_rel=merge_options.refit_lambda, weights=merge_options.weights,
                samples=merge_options.refit_samples, seed=seed, total=total, device=run_device, progress=progress,
                norms=merge_options.refit_norms)

        if refit_value == "gate":  # fitted on the examples not held out, kept if at least as faithful on those held out
            from hf_mudsc.apply.refit_gate import gated_refit

            averaging = get_method(AVERAGE_CHECK_METHOD)
            # Plain averaging divides by the weights' sum whatever `normalize=` says: auto's method reads none of it
            # (the merge says so), and linear unnormalised is the parents' sum, no baseline.
            average_options = dataclasses.replace(method_options, normalize=True)

            def plain_average() -> PreTrainedModel | None:
                """The parents' plain average (method "linear": the same weights, heads concatenated alike) as this
                merge's model, or None when it cannot stand in for it (other shapes: a size budget widened it)."""
                average_context, average_left = context_for(averaging, average_options)
                average_params = whole_parameters(averaging.merge_parameters(average_context).parameters,
                                                  average_left)
                if {k: v.shape for k, v in average_params.items()} != {k: v.shape for k, v in merged_params.items()}:
                    return None
                return build_model(model_a, copy.deepcopy(config), average_params)

            # `auto` on fine-tunes of one base: the merge it returns is held against plain averaging, task by task.
            check_average = (chosen_by_auto and relation.relation == "shared base" and concatenate
                             and merge_method is not averaging)
            merged, report.refit, gate = gated_refit(
                merged, loaded, calibration_batches, lambda model, data: run_refit(model, data, None),
                task_sizes=task_sizes, task_parents=task_parents,
                task_names=distinct_task_names([m.config for m in loaded]) if task_parents is not None and len(
                    task_parents) != len(loaded) else None,
                scorer=alpha_scorer,  # alpha="auto" held out the same examples: its parents' outputs are reused
                average=plain_average if check_average else None)
            merged.config.mudsc["refit_gate"] = gate.as_config()
            report.refit_gate = gate
            held = f"{merge_method.name}{' + refit' if gate.kept else ''}"  # the merge held against averaging
            if gate.average is not None:
                merged.config.mudsc["refit_gate"]["average"]["merge"] = held
            if gate.average is not None and gate.average.kept:
                lowered = gate_tasks_text(merged.config.mudsc["refit_gate"], gate.average.lowered)
                choice_reason = (f"{choice_reason}; then plain averaging ({averaging.name}): {held}'s merge scored "
                                 f"below it on the held-out examples of {lowered}")
                logger.info("method auto: %s", choice_reason)
                recorded = dataclasses.replace(
                    used, **{**dict.fromkeys(MergeOptions.names(per_method=True)),
                             **averaging.used_options(average_options)},
                    method=averaging.name, refit="none", refit_lambda=None, refit_norms=None, refit_samples=None)
                # The returned merge is recorded as method="linear" records it: no solve, matches, starts, size
                # budget or α curve of the merge it replaced (the card and inspect read them as this model's); the
                # path that chose it stays (reason, correspondence check, gate).
                warnings = warnings_for(  # (the data that chose it repeats examples: still said)
                    averaging, group_names=[], group_values=[], rows=None, shared_labels=None,
                    relation_text=relation_warning(relation.relation, averaging))
                average_option_warnings = _returned_average_warnings(
                    option_warnings, merge_options, averaging, average_options, calibration, count, spec.inputs,
                    strangers)
                warnings += [text for text in average_option_warnings + input_check.warnings if text not in warnings]
                merged.config.mudsc.update(
                    recorded.values(recorded=True), method_choice_reason=choice_reason, statistics_dtype=None,
                    group_match_values={}, start_objectives={}, solve_start=None, alpha_auto=None, size_budget=None,
                    warnings=list(warnings))
                merge_method, refitting, auto_alpha = averaging, False, False
                if merge_options.normalize is False:  # the recipe re-runs the average as it ran (normalized)
                    recipe_normalize = average_options.normalize
                report = dataclasses.replace(
                    report, method=averaging.name, matcher=None, alpha=None, refit=None, matches=[], group_names=[],
                    group_values=[], objective_history=[], sweeps=0, starts={}, solve_start=None, diagnostics=None,
                    warnings=list(warnings))
            elif not gate.kept and merge_method.used_options(method_options).get("weights") is None \
                    and used_options.get("weights") is not None:
                # The weights only weighted the refit's targets (`refit_read_options`): the merge returned without
                # it reads none, so they are recorded as its method records them and said to have had no effect.
                text = (f"{option_hint('weights')} {used_options['weights']} weighted only the refit's targets, "
                        f"and the refit gate dropped the refit (held-out scores in config.mudsc['refit_gate']): "
                        f"they have no effect on the returned {merge_method.name} merge")
                logger.warning("%s", text)
                report.warnings.append(text)
                merged.config.mudsc["warnings"].append(text)
                merged.config.mudsc["weights"] = None
        else:
            report.refit = run_refit(merged, calibration_batches, calibration_examples)
    if refitting:
        for text in getattr(report.refit, "warnings", ()):  # the refit's (not REPAIR's): logged, now kept too
            if text not in merged.config.mudsc["warnings"]:
                report.warnings.append(text)
                merged.config.mudsc["warnings"].append(text)
        merged.config.mudsc["refit_examples"] = report.refit.examples
        if accumulators is None and not report.num_samples:  # nothing else read the data: the refit's is the count
            held = (merged.config.mudsc["refit_gate"] or {}).get("held_out_examples", 0)  # the gate's held-out rows
            merged.config.mudsc["num_calibration_samples"] = report.num_samples = report.refit.examples + held
    # The one cast: everything above (solve, apply, refit) ran in float32.
    out_dtype, out_dtype_reason = cast_merged(merged, out_dtype, out_dtype_reason,
                                              asked=merge_options.out_dtype != AUTO)
    merged.config.mudsc.update(out_dtype=out_dtype, out_dtype_reason=out_dtype_reason)
    report.auto_out_dtype = auto_out_dtype
    merged = merged.to(run_device if device is not None else "cpu")
    refuse_non_finite(merged, params, base_params)
    report.weights_digest = parameters_digest(merged.state_dict())
    # The recipe keys (every option a recipe file may set, as given), parents and base pinned; `auto` is recorded
    # as the method it chose, so the recipe re-runs the same merge whatever a later release would choose.
    # `alpha="auto"` stays "auto" only where the search ran; a method that ignores α records the α it was handed.
    given = dataclasses.replace(merge_options, calibration=calibration_spec, method=merge_method.name,
                                alpha=AUTO if auto_alpha else method_options.alpha,
                                refit=refit_value if refitting else "none",
                                base=None if base_parent is None else pinned_reference(base_parent),
                                device=None if device is None else str(device), out_dtype=out_dtype,
                                normalize=recipe_normalize)
    report.recipe = {"models": [pinned_reference(p) for p in parents], **given.values(recipe=True)}
    report.processor = parents[0].processor
    _warn_licenses(parents, base_parent)
    report.processor_given = bool(
        processor is not None and report.num_samples and getattr(calibration, "preprocess", None) is not None
        and processor_fingerprint(processor) != processor_fingerprint(parents[0].processor))
    report.calibration_folders = calibration_folders
    merged.merge_report = report
    logger.info("merged %s with %s", ", ".join(parent_names), merge_method.name)
    return merged


def refuse_non_finite(merged: PreTrainedModel, parents: Sequence[Mapping[str, torch.Tensor]] = (),
                      base: Mapping[str, torch.Tensor] | None = None) -> None:
    """Never return (or write) NaN/inf merged weights. The parents were finite (refused before calibration by the
    relation check, `relation.parent_relation`, from the sums it takes of every tensor), so either the options
    overflowed float32 or a parent's finite weights were too large to combine: the merges add and subtract
    the N parents' and the base's values, so a sum reaches (N + 1) times the largest of them and a task vector twice
    that — values beyond float32's largest (3.4e38) / (2·(N + 1)) can overflow under default options. The first bad
    tensor's largest parent value says which, and the message names that parent (one tensor per parent read)."""
    bad = [name for name, tensor in merged.named_parameters()
           if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all()]
    if not bad:
        return
    found = [(float(params[bad[0]].abs().max()), f"parent {parent_label(index)}")
             for index, params in enumerate(parents) if bad[0] in params]
    if base is not None and bad[0] in base:
        found.append((float(base[bad[0]].abs().max()), "the base"))
    largest, who = max(found, key=lambda item: item[0], default=(0.0, ""))  # the first of equals: a parent
    limit = torch.finfo(torch.float32).max / (2 * (len(parents) + 1))
    head = f"the merged model has NaN or infinite values in {len(bad)} tensors (e.g. {bad[0]!r})"
    if largest > limit:
        raise MergeInputError(
            f"{head}: {bad[0]!r} of {who} holds values up to {largest:.3g}, too large for float32 sums of "
            f"{len(parents)} parents (over {limit:.3g}); its weights are out of range — re-export that checkpoint, "
            "or merge without it")
    raise MergeInputError(f"{head}: the options overflowed float32; use moderate {option_hint('weights')} / "
                          f"{option_hint('scaling')} values")


def _check_parent_count(method: MergeMethod, count: int, chosen: str | None = None) -> None:
    """Refuse a number of parents the method does not merge (before loading, unless `auto` chose it)."""
    if method.num_parents is None or method.num_parents == count:
        return
    why = f"method 'auto' chose {method.name!r} ({chosen}), which" if chosen else f"method {method.name!r}"
    raise MergeInputError(
        f"{why} merges exactly {method.num_parents} parents, got {count}; merge them {method.num_parents} at a "
        f"time, or choose a method that takes any number of parents: "
        f"{', '.join(m.name for m in METHODS.values() if m.num_parents is None) or 'none registered'} (CLI: --method)")


def _check_data(method: MergeMethod, calibration: Any, count: int, chosen: str | None = None,
                relation: str | None = None) -> None:
    """Refuse a method that reads calibration data when there is none (before loading, unless `auto` chose it:
    then the dataless methods offered are those that fit the parents' `relation`, `dataless_for`)."""
    if calibration is not None or not (method.needs_calibration or method.needs_data):
        return
    why = f"method 'auto' chose {method.name!r} ({chosen}), which" if chosen else f"method {method.name!r}"
    offered = (_dataless_for(relation) if chosen and relation is not None
               else " / ".join(map(repr, data_free_methods(count)[:3])))
    raise MergeInputError(
        f"{why} needs calibration data (a 'dataset:split' spec, a datasets.Dataset or an iterable of input batches); "
        "pass calibration= (CLI: --calibration)"
        + (f", or merge without data: method={offered} (CLI: --method)" if offered else "")
    )


def _dataless_for(relation: str) -> str:
    """The methods that merge parents of this relation without data, as offered in a refusal: the weight-only unit
    matching for parents whose units do not line up (a merge by position collapses them), else `auto`'s own
    dataless choices (`CHOICES`; a base-reading one marked)."""
    if relation in UNALIGNED_RELATIONS:
        names = [name for name in ("weight_matching",) if name in METHODS]
    else:
        names = [name for name in CHOICES.get((relation, True), ()) if name in METHODS
                 and not (METHODS[name].needs_calibration or METHODS[name].needs_data)]
    return " / ".join(f"{name!r}" + (" (with base)" if METHODS[name].needs_base_model else "") for name in names)


def _one_shot_refusal(method: MergeMethod, chosen: str | None, relation: str) -> str:
    """Why a one-shot iterator cannot feed `method` and what to pass instead; when `auto` chose the method (`chosen`
    is its reason), the line says so and offers the methods auto takes for these parents without data."""
    refusal = ("reads the calibration data more than once, so it cannot be a one-shot iterator; pass re-readable "
               "data (a list of batches or a datasets.Dataset)")
    if not chosen:
        return f"method {method.name!r} {refusal}"
    offered = _dataless_for(relation)
    return (f"method 'auto' chose {method.name!r} ({chosen}), which {refusal}"
            + (f", or merge without data: method={offered} (CLI: --method)" if offered else ""))


def _warn_unused(options: MergeOptions, used: Mapping[str, Any], method: MergeMethod, calibration: Any, count: int,
                 refit_value: str, inputs: Sequence[str] = (), *, data_note: str | None = None,
                 strangers: str = "", log: bool = True) -> list[str]:
    """Say which options change nothing (`diagnostics.unread_options_warning`, `inert_options_warnings`) or do less
    than they say (`MergeMethod.option_warnings`), and that
    `reference_compat=True` has no reference merge to reproduce with a method that matches no units; returns the
    texts said, which the merge records with its other warnings. `data_note`: why the data goes unread (`auto`'s
    dataless choice for want of memory), said instead of the advice to pass a method that reads it. `log` False:
    the texts are returned, not logged (the caller logs the ones that are new)."""
    reads_data = _reads_data(method, refit_value in REFITTING)
    unread = unread_options_warning(options, used, method.name, read=method.read_as_default(options))
    advice = advice_warnings(None, None, unread_data_warning(method.name, reads_data=reads_data,
                                                             has_data=calibration is not None, why=data_note), unread)
    said = [text for text in [unread, *inert_options_warnings(
            options, method=method.name, reads_base=method.needs_base_model, reads_data=reads_data,
            has_data=calibration is not None, refit=refit_value, pairs_heads=method.pairs_attention_heads,
            inputs=inputs, data_note=data_note, strangers=strangers)] if text]
    said += method.option_warnings(options, count)
    for text in said if log else ():
        logger.warning("%s", text, extra={ADVICE: text in advice})
    if reference_compat_unread(method, options):
        without = _refits(dataclasses.replace(options, reference_compat=False), method, calibration, count)
        effect = f": it only turned the refit off (refit {without!r} otherwise)" if without != refit_value else ""
        said.append(f"method {method.name} matches no units, so {option_hint('reference_compat')} has no reference "
                    f"merge to reproduce{effect}; pass method='mudsc' for the reference's merge")
        if log:
            logger.warning("%s", said[-1])
    return said


def _returned_average_warnings(said: Sequence[str], options: MergeOptions, averaging: MergeMethod,
                               average_options: MergeOptions, calibration: Any, count: int, inputs: Sequence[str],
                               strangers: str) -> list[str]:
    """The option warnings of the plain average `auto`'s averaging check returned, in place of `said` (those of the
    method it replaced, which name that method, its matching, its base or its refit): what `method="linear"` with
    `refit="none"` says of these options (`_warn_unused`) — but the data: it chose the average, so it is no
    "unread" data. The texts new to the user are logged."""
    data_text = unread_data_warning(averaging.name, reads_data=False, has_data=calibration is not None)
    texts = [text for text in _warn_unused(options, averaging.used_options(average_options), averaging, calibration,
                                           count, "none", inputs, strangers=strangers, log=False)
             if text != data_text]
    for text in texts:
        if text not in said:
            logger.warning("%s", text)
    return texts


def _correspondence_checker(relation: ParentRelation, chosen: MergeMethod, options: MergeOptions, calibration: Any,
                            count: int) -> MergeMethod | None:
    """The unit-matching method whose solve confirms `auto`'s same-base choice `chosen`
    (`methods.auto.correspondence_checker`), or None — also when that method cannot merge these parents with these
    options (then the choice stands as made, and a warning says so), and for a one-shot iterator a same-base method
    that reads the data itself cannot read after the check's statistics (merge() refuses it before any is read)."""
    checker = _planned_checker(relation, chosen, options, calibration)
    if checker is None:
        return None
    try:
        _check_parent_count(checker, count)
        checker.check_options(options, count)
        check_size(checker, options.size)
    except MergeInputError as error:
        _warn_unconfirmed(chosen, checker, error)
        return None
    return checker


def _planned_checker(relation: ParentRelation, chosen: MergeMethod, options: MergeOptions, calibration: Any
                     ) -> MergeMethod | None:
    """The check `auto`'s choice `chosen` is planned to get (`methods.auto.correspondence_checker`), before whether it
    can run with these options and memory is known (`_correspondence_checker`): what the choice's first log line
    says it waits for."""
    checker = correspondence_checker(relation.relation, chosen, has_data=calibration is not None,
                                     reference_compat=bool(options.reference_compat))
    if checker is None or (chosen.needs_data and isinstance(calibration, Iterator)):
        return None
    return checker


def _pair_in_place(checker: MergeMethod, models: Sequence[PreTrainedModel],
                   params: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, calibration: Any, *,
                   options: MergeOptions, batch_size: int, num_samples: int | None, statistics_dtype: Any,
                   device: Any, progress: bool, check: Callable[[Mapping[str, Any]], None] | None = None
                   ) -> tuple[float, int, bool]:
    """The share of units `checker`'s solve leaves in place (`solve.matchers.share_in_place`) for two of the parents
    (`models`, `params`: heads in parent A's label order), from their own statistics on the calibration data — its
    first start's share when that alone leaves most in place (`_start_in_place`). Every process of a distributed run
    solves (the reduced statistics are the same everywhere), so all decide alike. Also returns the calibration
    examples those statistics read, and whether the first start decided."""
    from hf_mudsc.calibrate.distributed import collect_statistics_distributed

    concatenate = spec.classifier is not None and not same_label_sets([m.config for m in models])
    accumulators = collect_statistics_distributed(
        models[0], models[1], spec, calibration, batch_size=batch_size, num_samples=num_samples,
        columns=_input_columns(models[0]), required=spec.inputs, progress=progress,
        statistics_dtype=statistics_dtype, device=device, check=check)
    examples = accumulators[0].examples or accumulators[0].count
    context = MethodContext(
        spec=spec, solve_spec=solve_spec(spec, concatenate), parents=list(params), base=None, models=list(models),
        batches=None, correlations=correlations_from(accumulators, constants=not options.reference_compat),
        concatenate_classifier=concatenate,
        options=dataclasses.replace(options, weights=[1.0, 1.0]), device=str(device), progress=progress)
    start_share = _start_decides(checker, context)
    if start_share is not None:
        return start_share, examples, True
    return share_in_place(checker.merge_parameters(context).matches), examples, False


def _start_decides(checker: MergeMethod, context: MethodContext) -> float | None:
    """The share of units `checker`'s first start leaves in place (`_start_in_place`) when that alone says the units
    correspond — said in a log line, which the service's progress reads as the solve's end
    (`serve.worker.PHASE_MARKS`) — else None: the solve decides."""
    share = _start_in_place(checker, context)
    if share is None or not units_correspond(share):
        return None
    logger.info("%s %s leaves %.1f%% of units in place, so the units correspond", CHECK_NEEDS_NO_SOLVE,
                check_solved_by(checker.name, first_start=True), 100 * share)
    return share


def _start_in_place(checker: MergeMethod, context: MethodContext) -> float | None:
    """The share of units `checker`'s first start (`MergeMethod.first_start`: the activation matching, unrefined)
    leaves in place with the zip matcher (`methods.auto.START_MATCHER`), or None for a method without one: `auto`'s
    check needs no solve when it is a majority."""
    zipped = dataclasses.replace(context, options=dataclasses.replace(context.options, matcher=START_MATCHER))
    matches = checker.first_start(zipped)
    return None if matches is None else share_in_place(matches)


def _fits_in_memory(model: PreTrainedModel, count: int, checker: MergeMethod, chosen: MergeMethod) -> bool:
    """Whether the statistics of `checker`'s solve fit in the memory available (`plan.check_memory`, the parents
    loaded); if not, `auto`'s choice `chosen` stands unconfirmed, and a warning says so — the same-base method
    itself needs no statistics, so refusing the merge would refuse what worked without the check."""
    try:
        check_memory(model, count, checker, loading=0)
    except MergeInputError as error:
        _warn_unconfirmed(chosen, checker, error)
        return False
    return True


def _check_alpha_data(method: MergeMethod, options: MergeOptions, calibration: Any, count: int) -> None:
    """alpha="auto" holds out every 5th example and reads them again to score each candidate: a one-shot iterator
    cannot give them (its search scored nothing and recorded zeros). Refused before any pass."""
    if isinstance(calibration, Iterator) and alpha_searched(method, options, count):
        raise MergeInputError("alpha='auto' scores candidate merges on held-out calibration examples it reads again, "
                              "so the data cannot be a one-shot iterator; pass a list of batches or a "
                              "datasets.Dataset, or a number for alpha")


def _warn_unconfirmed(chosen: MergeMethod, checker: MergeMethod, error: Exception) -> None:
    """Say that `auto`'s same-base choice `chosen` merges unconfirmed, because `checker`'s solve cannot run."""
    logger.warning("method auto: %s is not confirmed on the calibration data (whether the units correspond, by %s's "
                   "solve): %s", chosen.name, checker.name, error)


def _refits(options: MergeOptions, method: MergeMethod, calibration: Any, count: int) -> str:
    """The refit that runs: "none", "ridge" or "gate" (`refit="auto"` resolved for this method and data,
    `methods.auto.refit_runs`)."""
    return refit_runs(method, options.refit, has_data=calibration is not None, num_parents=count,
                      reference_compat=bool(options.reference_compat),
                      rereadable=not isinstance(calibration, Iterator), weights=options.weights)


def streams_parents(method: MergeMethod | None, options: MergeOptions, calibration: Any, count: int) -> bool:
    """Whether the parents after the first and the base are read one tensor at a time (`load_parents_and_base(
    lazy=True)`): for a tensor-wise method that reads no calibration data, nor refits — its memory then does not
    grow with the number of parents. merge() and the CLI (which loads the parents itself) decide by this."""
    if method is None or not method.streams:
        return False
    return not reads_calibration(method, options, calibration, count)


def reads_calibration(method: MergeMethod, options: MergeOptions, calibration: Any, count: int) -> bool:
    """Whether merging with `method` reads the calibration data: its statistics, the method itself, or the refit
    `options.refit` resolves to."""
    return _reads_data(method, _refits(options, method, calibration, count) in REFITTING)


def _reads_data(method: MergeMethod, refitting: bool) -> bool:
    return method.needs_calibration or method.needs_data or refitting


def check_before_weights(config: Any, options: MergeOptions, count: int, method: MergeMethod | None, *,
                         loading: int, copied: Sequence[str] = (), base: bool = False, base_copy: bool = False,
                         parents: Sequence[Any] = ()) -> None:
    """What the first parent's config (or model) refuses before any weights are read: a `size_spend` the
    architecture cannot spend, more parents than memory holds (`hf_mudsc.plan.check_memory`; `loading`: the
    parents that will be loaded whole, `method` None for `auto`; `copied`: `head_copies`; `base`: a base will be
    loaded whole, `base_loaded_whole`; `base_copy`: the base copied to parent A's label order, `base_copied`), and a
    head whose labels repeat a name in any of `parents` (as `load_parents_and_base`'s `check_config` gets them:
    `check_label_names`), and option values the method refuses for the model's shapes (`MergeMethod.check_shapes`).
    merge() and the CLI call it."""
    check_label_names(config, parents)
    check_size_spend(config, options)
    if method is not None:
        check_classifier(method, config if isinstance(config, PreTrainedModel) else meta_model(config))
        method.check_shapes(options, lambda: parameter_shapes(config))
    check_memory(config, count, method, loading=loading, copied=copied, base=base, base_copy=base_copy)


def choose_auto(relation: ParentRelation, options: MergeOptions, calibration: Any, count: int, *,
                has_base: bool, shortfall: Callable[[MergeMethod], tuple[float, float] | None] | None = None,
                strangers: str = "") -> tuple[MergeMethod, str, str | None]:
    """The method `auto` chooses for parents of this relation, and why, refused (one line naming the choice) when it
    cannot merge these parents with these options and data — the checks an explicit method gets before loading.

    `shortfall(method)`: (bytes needed, bytes available) when `method` cannot fit (`plan.memory_shortfall`). A data
    method chosen for fine-tunes of one base (regmean) that cannot fit gives way to the choice without data (linear,
    ties), with a warning: it would run out of memory in its pass where the dataless method merges. The third value
    then says why the calibration data goes unread (else None).

    `strangers`: the parents that are no fine-tunes of the base given (`not_fine_tunes`): their task vectors from it
    would be as large as their weights, so `auto` chooses as without a base, and its reason says so."""
    data_note = None
    unused_base = has_base and bool(strangers)
    has_base = has_base and not strangers
    try:
        method, reason = choose_method(relation.relation, relation.weight_distance, has_base=has_base,
                                       has_data=calibration is not None)
        short = shortfall(method) if shortfall is not None and method.needs_data else None
        if short is not None:
            dataless, dataless_reason = choose_method(relation.relation, relation.weight_distance, has_base=has_base)
            said, name = dataless_reason.rsplit("): ", 1)
            needs = (f"{method.name} needs {memory_text(short[0])} at once (its working set included) and "
                     f"{memory_text(short[1])} of memory is available")
            reason = f"{said}; {needs}): {name}"
            logger.warning("method auto: %s, so %s merges these parents instead (method=%r on a machine with more "
                           "memory)", needs, dataless.name, method.name)
            data_note = (f"method auto took {dataless.name}, which reads none, because {method.name} does not fit in "
                         f"the memory available; drop it, or merge with method={method.name!r} on a machine with "
                         "more memory")
            method = dataless
        if unused_base:
            said, name = reason.rsplit("): ", 1)
            reason = (f"{said}; the base given is not the parents' base by its weights ({strangers}), so it is not "
                      f"used): {name}")
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    checker = _planned_checker(relation, method, options, calibration)
    # A choice the check will confirm is said as pending: the check's outcome is logged once it has run.
    logger.info("method auto: %s", reason if checker is None else
                pending_reason(method, checker, relation.weight_distance))
    _check_parent_count(method, count, chosen=reason)
    _check_data(method, calibration, count, chosen=reason, relation=relation.relation)
    method.check_options(options, count)
    check_size(method, options.size, chosen=reason)
    return method, reason, data_note


def auto_before_loading(views: Sequence[LoadedParent], options: MergeOptions, calibration: Any, *, has_base: bool,
                        references: int, processor: Any = None, base: Any = None,
                        found_base: Any = None, base_view: LoadedParent | None = None) -> AutoChoice:
    """`auto`'s choice before any parent is loaded whole: `views` are the parents opened for reading one tensor at a
    time (`load_parents_and_base(choose_loading=...)`); their relation (heads aligned to parent A's label order, as
    after loading) chooses the method, and the memory it needs — the parents it loads whole (`references` of them are
    loaded, not given as objects), their reordered copies, its statistics — and the calibration columns it reads are
    checked from there, as an explicit method's are from the configs (`base`: the base as given, a reference is loaded
    whole unless streamed; `found_base`: the base as `load_parents_and_base` found it, its config or object, for its
    copy in parent A's label order: `plan.base_copied`). Loading every parent whole first took minutes for a long recipe
    before the choice was refused. The choice (`AutoChoice`) goes to `merge(auto_choice=...)` when the caller loads the
    parents. `base_view`: the base opened alike (or None: a base given as a model is read from `found_base`), whose
    relation to each parent decides whether a method reading task vectors from it may be chosen (`not_fine_tunes`)."""
    count = len(views)
    model_a = views[0].model
    for index, other in enumerate(views[1:], start=1):
        check_parents(model_a, other.model, labels=(parent_label(0), parent_label(index)))
    spec = spec_for(model_a)
    moved = [None, *(aligned_to_parent_a(view, model_a.config, spec) for view in views[1:])]
    aligned = [view if twin is None else twin for view, twin in zip(views, moved)]
    relation = check_parents_mergeable([view.parameters for view in aligned], spec,
                                       [view.repo_id or view.reference for view in views])
    base_links: list[ParentRelation] = []
    if has_base:
        base_params = None
        base_name = None  # a base read from its files: its NaN/inf refused here, before any parent loads whole
        from hf_mudsc.load.parents import LoadedParent, parameters_of

        if base_view is not None or isinstance(found_base, LoadedParent):
            given = base_view if base_view is not None else found_base
            base_params = parameters_of(aligned_to_parent_a(given, model_a.config, spec) or given)
            base_name = given.repo_id or given.reference
        elif isinstance(found_base, PreTrainedModel) and found_base.device.type != "meta":
            base_params = {name: tensor.detach() for name, tensor in found_base.named_parameters()}
        if base_params is not None:
            base_links = base_relations(base_params, [view.parameters for view in aligned], spec, name=base_name)

    def holds(method: MergeMethod) -> dict[str, Any]:
        """What a merge by `method` loads and copies whole (it streams parents when it can)."""
        lazy = streams_parents(method, options, calibration, count)
        return {"loading": min(references, 1) if lazy else references,
                "copies": len(head_copies([view.model.config for view in views], streaming=lazy)),
                "base": has_base and base_loaded_whole(base, None, streaming=lazy),
                "base_copy": base_copied(found_base, views[0], streaming=lazy)}

    method, reason, data_note = choose_auto(
        relation, options, calibration, count, has_base=has_base,
        shortfall=lambda chosen: memory_shortfall(model_a, count, chosen, **holds(chosen)),
        strangers=not_fine_tunes(base_links))
    if base_links:  # before any parent is loaded whole
        given = base_view if base_view is not None else found_base
        check_base_not_a_parent(getattr(given, "repo_id", None) or getattr(given, "reference", None)
                                or "given as base=", base_links, method)
    lazy = streams_parents(method, options, calibration, count)
    check_memory(model_a, count, method, loading=min(references, 1) if lazy else references, chosen=reason,
                 copied=head_copies([view.model.config for view in views], streaming=lazy),
                 base=has_base and base_loaded_whole(base, None, streaming=lazy),
                 base_copy=base_copied(found_base, views[0], streaming=lazy))
    if calibration is not None and reads_calibration(method, options, calibration, count):
        check_calibration_before_weights(calibration, [view.processor for view in views], model_a.config, options,
                                         given=processor)
    return AutoChoice(method=method, reason=reason, relation=relation, streams=lazy,
                      parents=tuple(view.pinned_reference for view in views), data_note=data_note,
                      base_links=tuple(base_links))


def _check_choice_parents(choice: AutoChoice, models: Sequence[Any]) -> None:
    """An `AutoChoice` judged other parents (or the same ones in another order) than `models`: its method would be
    applied to a relation nobody measured. Parents given as anything but the `LoadedParent`s it was made on are
    refused too — a folder or model object may hold other weights by now."""
    from hf_mudsc.load.parents import LoadedParent

    loaded = all(isinstance(model, LoadedParent) for model in models)
    given = [model.pinned_reference if isinstance(model, LoadedParent) else
             os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"a {type(model).__name__} object"
             for model in models]
    if loaded and tuple(given) == choice.parents:
        return
    why = "other parents or another order" if loaded else "not the LoadedParents it was made on"
    raise MergeInputError(
        f"auto_choice was made on the parents {', '.join(display_name(p) for p in choice.parents)}, not on these "
        f"({', '.join(display_name(p) for p in given)}: {why}); pass the LoadedParents it was chosen on, or leave "
        "it out (merge() then chooses itself)")


def check_calibration_before_weights(calibration: Any, processors: Any, config: Any, options: MergeOptions,
                                     given: Any = None, unreadable: Sequence[str | None] = ()) -> None:
    """Refuse calibration data whose columns the parents cannot read (a missing model input, a raw column no parent's
    processor preprocesses) from the first parent's config (or model) and the parents' processors, before any
    weights are read (`hf_mudsc.calibrate.datasets.check_calibration_columns`). merge() and the CLI call it for a
    method that reads the data. `given`: the processor passed to merge(), read instead of the parents' (and named
    when it cannot read the data). `unreadable`: why a parent's tokenizer could not be read (None where it could),
    said with the refusal when no processor at all could preprocess the data."""
    from hf_mudsc.calibrate.datasets import CALIBRATION, check_calibration_columns, given_processor_role
    from hf_mudsc.calibrate.statistics import check_first_batch

    model = config if isinstance(config, PreTrainedModel) else meta_model(config)
    try:
        check_calibration_columns(calibration, given if given is not None else processors,
                                  image_column=options.image_column, text_column=options.text_column,
                                  inputs=spec_for(model).inputs or None, model_config=model.config,
                                  role=given_processor_role(given) if given is not None else CALIBRATION)
    except CalibrationError as error:
        reason = next((why for why in unreadable if why), None)
        if given is not None or reason is None or any(p is not None for p in processors):
            raise
        raise type(error)(f"{error}. {reason}") from None
    check_first_batch(calibration, model.config, spec_for(model).inputs)


def parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the first parent's model (`config`: its config, or the model), weightless."""
    model = config if isinstance(config, PreTrainedModel) else meta_model(config)
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def check_label_names(config: Any, parents: Sequence[Any]) -> None:
    """Refuse a parent whose `id2label` gives one name to several classes (`apply.classifier.repeated_label`), when
    the model has a classifier (`config`: the first parent's config or model; `parents`: each a config, a model or a
    `LoadedParent`, parent A first), before any weights are read: the merged config could not map each name to one
    class (docs/design.md §6)."""
    message = repeated_labels_message([config_of(parent) for parent in parents])
    if message is not None:
        model = config if isinstance(config, PreTrainedModel) else meta_model(config)
        if spec_for(model).classifier is not None:  # without a head the labels name nothing the merge writes
            raise MergeInputError(message)


def check_size_spend(config: Any, options: MergeOptions) -> None:
    """A `size_spend` the architecture cannot spend, refused from the first parent's config (or model) before any
    weights are read (the spec of a weightless model; docs/design.md §4.12). merge() and the CLI call it."""
    if options.size != 1.0 and options.size_spend != "mlp":
        model = config if isinstance(config, PreTrainedModel) else meta_model(config)
        check_spend(spec_for(model), options.size, options.size_spend)


def _check_per_parent_options(options: MergeOptions, count: int) -> None:
    """`weights` (and a `density`, `gamma` or `epsilon` list) give one value per parent, in parent order."""
    for name in MergeOptions.names(kind="numbers") + MergeOptions.names(kind="number_or_numbers"):
        value = getattr(options, name)
        if isinstance(value, list) and len(value) != count:
            raise MergeInputError(f"{option_hint(name)} gives {len(value)} values for {count} parents; give one "
                                  "per parent, in parent order")


def _check_base(base: Any, model_a: PreTrainedModel, spec: PermutationSpec,
                weights: Sequence[float] | None = None, *, concatenated_head: bool = False
                ) -> Mapping[str, torch.Tensor]:
    """The base's parameters (CPU; read lazily when the base was opened so), refused in one line unless every
    parent tensor has its shape in the base (a classifier of another label set aside: it is left out) and every
    value is finite. Tensors its checkpoint lacks (`base.absent`: a base of another head class) are left out too:
    the parents' weighted mean fills them (`_fill_missing`), never their fresh initialisation — so `weights` summing
    to 0 or scaling a parent beyond ±100 there (which task arithmetic accepts) are refused here, before any tensor is
    merged (`plan.check_filled_weights`; the dry run refuses alike) — not the head when the parents' heads are
    concatenated (`concatenated_head`: each parent's own rows, no mean)."""
    from hf_mudsc.load.parents import parameters_of

    name = base.repo_id or base.reference
    base_params = parameters_of(base)
    shapes = {k: tuple(v.shape) for k, v in base.model.named_parameters() if k not in base.absent}  # meta: no values
    head = {spec.classifier.weight, spec.classifier.bias} if spec.classifier else set()
    dropped = set(base.absent)
    for key, tensor in model_a.named_parameters():
        found = shapes.get(key)
        if found is not None and found == tuple(tensor.shape):
            continue
        if key in head or key in base.absent:
            dropped.add(key)  # a head of other labels, or one the base lacks: merged without the base
            continue
        shape = "missing" if found is None else f"{found}"
        raise MergeInputError(
            f"the base {name!r} does not fit the parents: tensor {key!r} is {shape} in the base but "
            f"{tuple(tensor.shape)} in the parents; pass the base the parents were fine-tuned from "
            f"({option_hint('base')})")
    if head - dropped and not same_head_labels(model_a.config, base.model.config):
        logger.info("the base %s's classifier names other labels (%s) than the parents (%s): left out, the parents' "
                    "weighted mean is the merged head", name, ", ".join(label_names(base.model.config)),
                    ", ".join(label_names(model_a.config)))
        dropped |= head
    check_filled_weights(name, [key for key, _ in model_a.named_parameters()
                                if key in dropped and not (concatenated_head and key in head)], weights)
    for key, tensor in base_params.items():
        if key not in dropped and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise non_finite_refusal(f"the base {name!r}", key)  # the words `auto` refuses it in before loading
    names = dict(model_a.named_parameters())
    if not dropped and all(key in names for key in base_params):
        return base_params
    return subset(base_params, lambda key: key in names and key not in dropped)


def _warn_licenses(parents: Sequence[LoadedParent], base: LoadedParent | None) -> None:
    """Say when the parents' model cards declare different licences (`license_conflict`)."""
    said = license_conflict([p.license for p in parents], None if base is None else base.license, base is not None)
    if said is not None:
        logger.warning("%s", said)


# How a parent relates to a base it is no fine-tune of (`hf_mudsc.load.relation`): its task vector from that base is
# as large as its weights.
NOT_FINE_TUNES = ("independent", "protected", "permuted copy")


def not_fine_tunes(relations: Sequence[ParentRelation]) -> str:
    """The parents that are no fine-tunes of the base, as a reason says them ("parent A independent of it, relative
    distance 1.41"), or "" when every parent is one (`relations`: each parent's relation to the base)."""
    return ", ".join(f"parent {parent_label(index)} {relation.relation} of it, relative distance "
                     f"{relation.weight_distance:.3g}" for index, relation in enumerate(relations)
                     if relation.relation in NOT_FINE_TUNES)


def check_base_not_a_parent(name: str, relations: Sequence[ParentRelation], method: MergeMethod) -> None:
    """Refuse a base that is one of the parents by its weights (`relations`: each parent's to the base, "same model"
    for identical tensors) when `method` reads the base: that parent's task vector is 0 and it would add nothing —
    ties merged the other's trimmed task vector onto it, logged at INFO only. The dry run refuses it from the weight
    files (`plan`)."""
    same = [parent_label(index) for index, relation in enumerate(relations) if relation.relation == "same model"]
    if same and method.needs_base_model:
        raise MergeInputError(base_is_a_parent(name, same, method.name, "by its weights (the same model)"))


def _log_base_relations(base: Any, relations: Sequence[ParentRelation], *, unused: bool) -> None:
    """Say how each parent relates to the base; warn about parents that do not look like fine-tunes of it, and what
    that means for the merge (`unused`: the merge's method reads no base)."""
    name = base.repo_id or base.reference
    consequence = "the merge does not read it" if unused else "task vectors from this base will be large"
    for index, relation in enumerate(relations):
        if relation.relation in NOT_FINE_TUNES:
            logger.warning("parent %s is not a fine-tune of the base %s by its weights (%s, relative distance %.3g); "
                           "%s", parent_label(index), name, relation.relation, relation.weight_distance, consequence)
    logger.info("base %s: parents relate to it as %s", name, ", ".join(
        f"{r.relation} ({r.weight_distance:.3g})" for r in relations))


def _without(params: Mapping[str, torch.Tensor], names: set[str]) -> Mapping[str, torch.Tensor]:
    return subset(params, lambda key: key not in names) if names else params


def _aligned_heads(parents: list[LoadedParent], spec: PermutationSpec) -> tuple[list[LoadedParent], list[bool]]:
    """The parents, each whose head lists parent A's labels in another order replaced by a copy reordered to A's
    (`apply.classifier.aligned_to_parent_a`), and which were: every method, the refit, the evaluation and the card then
    see one label set instead of a concatenated head naming every class twice."""
    config_a = parents[0].model.config
    copies = [None, *(aligned_to_parent_a(parent, config_a, spec) for parent in parents[1:])]
    reordered = [moved is not None for moved in copies]
    aligned = [parent if moved is None else moved for parent, moved in zip(parents, copies)]
    if any(reordered):
        which = [parent_label(i) for i, moved in enumerate(reordered) if moved]
        logger.info("parent%s %s list%s parent A's labels in another order: head reordered to parent A's label "
                    "order (%s)", "s" if len(which) > 1 else "", ", ".join(which), "" if len(which) > 1 else "s",
                    ", ".join(label_names(config_a)))
    return aligned, reordered


def _aligned_base(base: LoadedParent | None, config_a: Any, spec: PermutationSpec) -> LoadedParent | None:
    """The base, as a copy in parent A's label order when its head lists A's labels in another order: task vectors
    subtract the base's rows from the parents' rows of the same label (a head the base lacks is left out anyway)."""
    if base is None or spec.classifier is None or {spec.classifier.weight, spec.classifier.bias} & base.absent:
        return base
    aligned = aligned_to_parent_a(base, config_a, spec)
    if aligned is None:
        return base
    logger.info("the base lists parent A's labels in another order: head reordered to parent A's label order")
    return aligned


def _fill_missing(merged: dict[str, torch.Tensor], params: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> None:
    """Parameters a method left out (a base without a head for these labels) become the parents' weighted mean."""
    missing = [k for k in params[0] if k not in merged]
    if not missing:
        return
    from hf_mudsc.solve.task_vectors import linear

    logger.info("%d tensors the method did not merge (not in the base: %s) are the parents' weighted mean",
                len(missing), ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    merged.update(linear(None, [{k: p[k] for k in missing} for p in params], list(weights)))


def _check_pass(checker: MergeMethod, pair: str = "") -> str:
    """How the log names the statistics pass of `auto`'s correspondence check (`pair`: the two parents solved, when
    more were given)."""
    return f"{checker.name}'s statistics for the correspondence check{f' of {pair}' if pair else ''}"


def _log_sample_count(used: int, what: str, *, held_out: bool = False) -> None:
    """Say how many calibration samples the pass `what` read, once per pass and named: a merge whose `auto` choice is
    checked reads the data for the check's statistics and again for the same-base method, and under alpha="auto" the
    two counts differ (`held_out`: every 5th example was kept out of these statistics to score the α candidates)."""
    logger.info("calibrated on %d samples: %s%s", used, what,
                " (every 5th example held out for alpha='auto')" if held_out else "")


def _warn_short(asked: int | None, used: int) -> bool:
    """Warn when the data held fewer samples than `num_samples` asked for (`used`: every example read, held-out ones
    included); returns whether it warned."""
    if asked is None or used >= asked:
        return False
    logger.warning("%s asked for %d calibration samples, but the data holds only %d; all %d were used",
                   option_hint("num_samples"), asked, used, used)
    return True


def _calibration_name(calibration: Any) -> str | None:
    """A printable name of the calibration data for the config and card (a spec string or dataset name)."""
    if isinstance(calibration, (str, os.PathLike)):
        return display_name(str(calibration))
    info = getattr(calibration, "info", None)
    return getattr(info, "dataset_name", None) or None


def _input_columns(model: PreTrainedModel) -> set[str]:
    from hf_mudsc.calibrate.layer_inputs import model_input_names

    return model_input_names(model)


def from_pretrained(model_a: Any, model_b: Any, calibration: Any = None, *, token: str | bool | None = None,
                    allow_pickle: bool = False, **merge_options: Any) -> PreTrainedModel | None:
    """Merge two Hub repos (or folders / objects) into one model: `hf_mudsc.merge` with Hub loading in front.

    `model_a`/`model_b`: `"org/name"`, `"org/name@revision"`, a local folder or a `PreTrainedModel`. Two parents,
    as `transformers`' `from_pretrained` reads one name each (a third positional argument is `calibration`): for three
    or more, `hf_mudsc.merge([a, b, c, ...], calibration, ...)`, which loads them the same way.
    `calibration`: a `"repo_or_path[:config]:split"` spec, a `datasets` dataset (raw or model-input
    columns) or an iterable of input batches. `token`: a Hub token for private parents or data (default: `HF_TOKEN`
    or the stored login; never logged). `allow_pickle`: load parents that only have pickle weights
    (`pytorch_model.bin`: a pickle can run code when loaded; trusted sources only). `merge_options` are
    `hf_mudsc.merge`'s keywords.

    Returns:
        What `hf_mudsc.merge` returns: the merged `PreTrainedModel` (a `MergePlan` with `dry_run=True`); under
        `torchrun`/`accelerate launch` only the main process gets it, the others get None.
    """
    return merge([model_a, model_b], calibration, token=token, allow_pickle=allow_pickle, **merge_options)
