"""`hf_mudsc.merge`: two parents -> checks -> calibration -> solve -> apply -> a stock PreTrainedModel."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_mudsc._version import __version__
from hf_mudsc.apply.build import build_model
from hf_mudsc.apply.classifier import concatenated_classifier_config, distinct_task_names, same_label_set
from hf_mudsc.apply.refit import RefitReport, refit_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import correlations_from
from hf_mudsc.calibrate.device import resolve_device
from hf_mudsc.errors import MergeInputError, OptionError
from hf_mudsc.load.checks import REMOTE_CODE_CONFIG_KEYS, check_parents
from hf_mudsc.load.references import display_name, parent_name, pinned_calibration, pinned_reference
from hf_mudsc.load.relation import check_mergeable
from hf_mudsc.methods.registry import MethodContext, get_method
from hf_mudsc.options import AUTO, MergeOptions, option_hint
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What the merge did, for logs and the model card (attached to the merged model as `merge_report`)."""

    method: str
    matcher: str | None
    alpha: float | None
    group_names: list[str] = field(default_factory=list)
    group_values: list[float] = field(default_factory=list)
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    # The solve's starts (docs/design.md §4.5): each start's final objective, in the order they ran, and the
    # start whose solution was kept (`objective_history`, `sweeps` and `group_values` are that start's).
    starts: dict[str, float] = field(default_factory=dict)
    solve_start: str | None = None
    num_samples: int = 0
    # One Match per spec group (None for groups left unmatched, e.g. by `average`): which original units
    # of A and B were fused into each merged unit — what benchmarks and analyses of a merge need.
    matches: list[Match | None] = field(default_factory=list)
    # What `hf_mudsc.save_merged`/`push_merged` write next to the model: the merge's inputs and options as
    # recipe keys (parents pinned: `org/name@sha`, local folders absolute), and parent A's processor.
    recipe: dict[str, Any] = field(default_factory=dict)
    processor: Any = None
    # What `refit="ridge"` did (layers, steps, shared-basis score, time); None without a refit.
    refit: RefitReport | None = None


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


def merge(
    models: Sequence[Any],
    calibration: Any = None,
    *,
    method: str = "mudsc",
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
    device: str | torch.device | None = None,
    processor: Any | None = None,
    refit: str = "none",
    refit_lambda: float = 1e-3,
    refit_samples: int | None = 128,
) -> PreTrainedModel | None:
    """Merge two fine-tuned models of one architecture into one model, without training.

    The options (everything but `models`, `calibration`, `progress`, `token` and `processor`) are declared with
    their checks in `hf_mudsc.options.MergeOptions`, which also gives the CLI flags and recipe keys.

    Args:
        models: two parents of the same class and configuration: `PreTrainedModel`s, local folders,
            Hub ids `"org/name"` / `"org/name@revision"`, or `hf_mudsc.load.parents.LoadedParent`s.
        calibration: data for the activation statistics — a `"repo_or_path[:config]:split"` spec (streamed
            with `datasets.load_dataset`), a `datasets.Dataset`/`IterableDataset` with model-input columns
            (`pixel_values`, `input_ids`/`attention_mask`) or raw columns (`image`/`img`, `text`/`sentence`,
            preprocessed with the parents' processor), a `hf_mudsc.calibrate.datasets.CalibrationStream`, or an iterable
            of dict batches. Not needed by `weight_matching` and `average`.
        method: a name from `hf_mudsc.METHODS` (`mudsc`, `zipit`, `activation_align`,
            `weight_matching`, `average`).
        matcher: `zip` or `align` for `mudsc` (the other methods fix their own).
        alpha: weight-similarity share of the dual-space similarity (MuDSC's balance factor), or `"auto"`: chosen
            without labels from the grid 0.1, 0.3, ..., 0.9 by the merges' fidelity to the parents on held-out
            calibration examples (every 5th; the statistics use the others), the curve recorded in
            `config.mudsc["alpha_auto"]` and the card (`hf_mudsc.apply.fidelity`).
        num_samples: calibration samples to use (all when None), chosen by a shuffle seeded with `seed`.
        batch_size: calibration batch size (examples per forward pass: speed against memory).
        seed: seeds the calibration subset and the random group order of the solve sweeps.
        zip_decay, zip_budget: ZipIt's α (similarity decay after a fusion) and β (same-model budget).
        independent_heads: pair q/k heads and v heads separately, as the reference implementation does.
        reference_compat: reproduce the reference implementation's merged weights (its `+1e-5` merge
            normaliser and independent head pairing).
        progress: show progress bars for calibration and the solve.
        token: Hub token for private parents/datasets (default: the usual places; never logged).
        allow_pickle: load parents that only have pickle (`pytorch_model.bin`) weights — only if trusted.
        image_column, text_column: raw calibration columns to preprocess (default `image`/`img`,
            `text`/`sentence`).
        statistics_dtype: `"float32"` (default) multiplies each batch's mean-shifted activations in float32
            and sums the products in float64 — about twice as fast on CPUs, merged weights equal to the
            `"float64"` path to ~1e-6 on the test models (nearly tied units of a large model may pair
            differently); `"float64"` keeps every product in float64. A `torch.dtype` is accepted too.
        device: where the calibration forward passes and statistics products run: `"cpu"`, `"cuda"`,
            `"cuda:N"` or a `torch.device`; None = CUDA when available, else the CPU. Parents are read into
            CPU memory (as `from_pretrained` does), moved to the device for calibration and moved back;
            the solve's weight-similarity products run there too, while statistics sums, matching and the
            apply step stay on the CPU. The merged model is returned on `device` when one was given, on
            the CPU otherwise (like `from_pretrained`).
        refit: `"ridge"` refits every linear layer after the apply step, in forward order, by ridge least squares
            toward the parents' outputs mapped into the merged basis, on the calibration data (no labels, no
            gradients; docs/design.md §4.9): across initializations it closes most of the gap to the ensemble
            (toy digit ViTs: joint 34 -> 77, ensemble 74). Opt-in: measured on MiniLM it costs more than the
            merge-time budget (docs/design.md §4.9), so the default stays `"none"` (the paper's merge).
            Needs calibration data, also for `average`; it reads the data once per layer step (not a one-shot
            iterator). Under `torchrun` it runs on the main process over the whole calibration stream.
        refit_lambda: the refit's ridge strength relative to each layer's mean input energy (pulls toward the
            matched weights).
        refit_samples: calibration examples the refit reads, chosen by a shuffle seeded with `seed` (None: all).
        processor: preprocesses raw calibration columns (a tokenizer, image processor or processor) instead of
            the parents' own — which are found in their folders, or for model objects in their `name_or_path`
            folder or cached Hub snapshot.

    Returns:
        A `PreTrainedModel` of the parents' class; `save_pretrained`/`push_to_hub` work as usual.
        When the parents' label sets differ, the classifier is A's classes then B's and
        `config.task_label_ranges` maps each task to its slice. Under `torchrun`/`accelerate launch`
        every process computes its share of the calibration statistics; only the main process
        (`hf_mudsc.calibrate.distributed.is_main_process()`) solves and gets the model, the others get None.
    """
    # Every option, before anything is loaded (the same checks as a recipe and the CLI): the keyword arguments
    # above that `MergeOptions` declares (tests/test_options_agree.py keeps the two lists equal).
    keywords = {name: value for name, value in locals().items() if name in MergeOptions.names(keyword=True)}
    try:
        merge_options = MergeOptions.from_keywords(**keywords)
        merge_options.check_combination()
    except OptionError as error:
        raise MergeInputError(str(error)) from None
    alpha, zip_decay, zip_budget, statistics_dtype = (merge_options.alpha, merge_options.zip_decay,
                                                      merge_options.zip_budget, merge_options.statistics_dtype)
    merge_method = get_method(method)
    if len(models) != merge_method.num_parents:
        raise MergeInputError(f"merge takes exactly two parents, got {len(models)}")
    if merge_method.needs_base_model:
        raise MergeInputError(f"method {method!r} needs a base model, which merge() does not take yet; "
                              "choose another method (CLI: --method)")
    try:
        run_device = resolve_device(device)
    except ValueError as error:
        raise MergeInputError(str(error)) from None
    from hf_mudsc.calibrate.datasets import load_calibration_dataset, pin_calibration_revision, resolve_calibration
    from hf_mudsc.calibrate.distributed import collect_statistics_distributed, is_main_process
    from hf_mudsc.load.parents import load_parents

    refitting = merge_options.refit != "none"
    needs_data = merge_method.needs_calibration or refitting
    if refitting and calibration is None:
        raise MergeInputError(f"refit={refit!r} needs calibration data (a 'dataset:split' spec, a datasets.Dataset "
                              "or a list of input batches); pass calibration, or refit='none' (CLI: --refit none)")
    if refitting and isinstance(calibration, Iterator):
        raise MergeInputError(f"refit={refit!r} reads the calibration data once per layer step, so it cannot be a "
                              "one-shot iterator; pass a list of batches or a datasets.Dataset")
    if merge_method.needs_calibration and calibration is None:
        raise MergeInputError(
            f"method {method!r} needs calibration data (a 'dataset:split' spec, a datasets.Dataset or an iterable "
            "of input batches); use method='weight_matching' or 'average' (CLI: --method) to merge without data"
        )
    calibration_name = _calibration_name(calibration) if needs_data else None
    calibration_spec = None
    if needs_data and isinstance(calibration, (str, os.PathLike)):
        # A Hub dataset is pinned to its commit (the recipe records it) and read at that commit; a spec that
        # does not exist fails here, before any parent weights are downloaded.
        calibration_spec = pinned_calibration(pin_calibration_revision(os.fspath(calibration), token=token))
        calibration = load_calibration_dataset(calibration_spec, token=token)
    parents = load_parents(list(models), token=token, allow_pickle=allow_pickle)
    model_a, model_b = parents[0].model, parents[1].model
    check_parents(model_a, model_b)
    spec = spec_for(model_a)
    spec_for(model_b)
    # A protected parent is refused here, before calibration and before anything is written or pushed.
    relation = check_mergeable({k: v.detach() for k, v in model_a.named_parameters()},
                               {k: v.detach() for k, v in model_b.named_parameters()}, spec,
                               [p.repo_id or parent_name(p.model, f"model_{side}") for p, side in zip(parents, "ab")])
    used_matcher = merge_method.used_matcher(matcher)
    # alpha="auto" (docs/design.md §4.4): only for a method that reads the balance factor from activations.
    auto_alpha = alpha == AUTO and merge_method.needs_calibration and merge_method.recorded_alpha(0.5) is not None
    alpha = 0.5 if alpha == AUTO else alpha  # what a method that ignores α is handed (and records: nothing)

    accumulators = None
    if needs_data:
        calibration = resolve_calibration(
            calibration, processor if processor is not None else [p.processor for p in parents],
            image_column=image_column, text_column=text_column,
            num_samples=num_samples, seed=seed, inputs=spec.inputs or None, model_config=model_a.config,
            token=token,
        )
    held_out = None
    statistics_data, statistics_samples = calibration, num_samples
    if auto_alpha:  # every 5th example is held out to score the candidate merges; the rest feed the statistics
        from hf_mudsc.apply.fidelity import holdout_split
        from hf_mudsc.calibrate.statistics import iter_batches

        statistics_data, held_out = holdout_split(lambda: iter_batches(
            calibration, batch_size=batch_size, num_samples=num_samples, columns=_input_columns(model_a),
            required=spec.inputs))
        statistics_samples = None
    if merge_method.needs_calibration:
        accumulators = collect_statistics_distributed(
            model_a, model_b, spec, statistics_data, batch_size=batch_size, num_samples=statistics_samples,
            columns=_input_columns(model_a), required=spec.inputs, progress=progress,
            statistics_dtype=statistics_dtype, device=run_device,
        )
    if not is_main_process():
        logger.info("statistics shared with the main process, which solves and builds the merged model")
        return None

    # The solve and apply run on the CPU (no copy for parents already there).
    params_a = {k: v.detach().cpu() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach().cpu() for k, v in model_b.named_parameters()}
    report = MergeReport(method=method, matcher=used_matcher, alpha=merge_method.recorded_alpha(alpha))
    concatenate = spec.classifier is not None and not same_label_set(model_a.config, model_b.config)
    correlations = None
    calibration_examples = None  # examples the calibration stream holds, when the statistics counted them
    if accumulators is not None:
        calibration_examples = accumulators[0].examples or None
        report.num_samples = accumulators[0].examples or accumulators[0].count
        _log_sample_count(num_samples, report.num_samples)
        correlations = correlations_from(accumulators)
    context = MethodContext(
        spec=spec, params_a=params_a, params_b=params_b,
        solve_spec=solve_spec(spec, concatenate, reference_rows=reference_compat and spec.classifier is not None
                              and params_a[spec.classifier.weight].shape == params_b[spec.classifier.weight].shape),
        correlations=correlations, concatenate_classifier=concatenate, matcher=matcher, alpha=float(alpha),
        zip_decay=zip_decay, zip_budget=zip_budget, independent_heads=independent_heads,
        reference_compat=reference_compat, seed=seed, device=str(run_device), progress=progress,
    )
    alpha_curve = None
    if auto_alpha:
        from hf_mudsc.apply.fidelity import FidelityScorer, search_alpha

        head_config = copy.deepcopy(model_a.config)
        if concatenate:
            for key, value in concatenated_classifier_config(
                model_a.config, model_b.config, distinct_task_names(model_a.config, model_b.config)
            ).items():
                setattr(head_config, key, value)
        scorer = FidelityScorer([model_a, model_b], held_out, mask_key="attention_mask", task_sizes=[
            params_a[spec.classifier.weight].shape[0], params_b[spec.classifier.weight].shape[0]] if concatenate
            else None)
        chosen_alpha, result, alpha_curve = search_alpha(
            merge_method, context, scorer, lambda parameters: build_model(model_a, head_config, parameters))
        report.alpha = chosen_alpha
    else:
        result = merge_method.merge_parameters(context)
    report.matches = list(result.matches)
    report.group_names = list(result.group_names)
    report.group_values = list(result.group_values)
    report.objective_history = list(result.objective_history)
    report.sweeps = result.sweeps
    report.starts = dict(result.start_objectives)
    report.solve_start = result.solve_start
    merged_params = result.parameters

    config = copy.deepcopy(model_a.config)
    for key in REMOTE_CODE_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    parent_names = [p.repo_id or parent_name(p.model, f"model_{side}") for p, side in zip(parents, "ab")]
    if concatenate:
        for key, value in concatenated_classifier_config(
            model_a.config, model_b.config, distinct_task_names(model_a.config, model_b.config)
        ).items():
            setattr(config, key, value)
    # What the merge used, for each option declared `recorded` (an option the method does not use is None).
    used = dataclasses.replace(
        merge_options, calibration=calibration_name, matcher=used_matcher, alpha=report.alpha,
        zip_decay=zip_decay if used_matcher == "zip" else None,
        zip_budget=zip_budget if used_matcher == "zip" else None,
        independent_heads=bool(independent_heads or reference_compat), reference_compat=bool(reference_compat),
        statistics_dtype=statistics_dtype if merge_method.needs_calibration else None,
        refit_lambda=merge_options.refit_lambda if refitting else None,
        refit_samples=merge_options.refit_samples if refitting else None)
    config.mudsc = {
        "library": "hf_mudsc",
        "version": __version__,
        **used.values(recorded=True),
        "parents": parent_names,
        "parent_revisions": [p.commit_sha for p in parents],
        "num_calibration_samples": report.num_samples,
        "group_match_values": {n: round(float(v), 6) for n, v in zip(report.group_names, report.group_values)},
        "solve_start": report.solve_start,
        "start_objectives": {name: round(float(v), 6) for name, v in report.starts.items()},
        "parent_relation": relation.as_config(),
        "alpha_auto": alpha_curve,  # the α search's curve (alpha="auto"), else None
    }
    config._name_or_path = ""
    merged = build_model(model_a, config, merged_params)
    if refitting:
        from hf_mudsc.calibrate.statistics import iter_batches

        report.refit = refit_model(
            merged, [model_a, model_b], spec, report.matches,
            lambda: iter_batches(calibration, batch_size=batch_size, num_samples=num_samples,
                                 columns=_input_columns(model_a), required=spec.inputs),
            concatenate_classifier=concatenate, lambda_rel=merge_options.refit_lambda,
            samples=merge_options.refit_samples, seed=seed, total=calibration_examples, device=run_device,
            progress=progress)
        if accumulators is None:  # a method without statistics: the refit's data is the calibration
            merged.config.mudsc["num_calibration_samples"] = report.num_samples = report.refit.examples
    merged = merged.to(run_device if device is not None else "cpu")
    # The recipe keys (every option a recipe file may set, as given), parents pinned.
    given = dataclasses.replace(merge_options, calibration=calibration_spec,
                                device=None if device is None else str(device))
    report.recipe = {"models": [pinned_reference(p) for p in parents], **given.values(recipe=True)}
    report.processor = parents[0].processor
    merged.merge_report = report
    logger.info("merged %s and %s with %s", parent_names[0], parent_names[1], method)
    return merged


def _log_sample_count(asked: int | None, used: int) -> None:
    """Say how many calibration samples were used; warn when fewer than `num_samples` asked for."""
    if asked is not None and used < asked:
        logger.warning("%s asked for %d calibration samples, but the data holds only %d; all %d were used",
                       option_hint("num_samples"), asked, used, used)
    else:
        logger.info("calibrated on %d samples", used)


def _calibration_name(calibration: Any) -> str | None:
    """A printable name of the calibration data for the config and card (a spec string or dataset name)."""
    if isinstance(calibration, (str, os.PathLike)):
        return display_name(str(calibration))
    info = getattr(calibration, "info", None)
    return getattr(info, "dataset_name", None) or None


def _input_columns(model: PreTrainedModel) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def from_pretrained(model_a: Any, model_b: Any, calibration: Any = None, *, token: str | bool | None = None,
                    allow_pickle: bool = False, **merge_options: Any) -> PreTrainedModel | None:
    """Merge two Hub repos (or folders / objects) into one model: `hf_mudsc.merge` with Hub loading in front.

    `model_a`/`model_b`: `"org/name"`, `"org/name@revision"`, a local folder or a `PreTrainedModel`.
    `calibration`: a `"repo_or_path[:config]:split"` spec, a `datasets` dataset (raw or model-input
    columns) or an iterable of input batches. `merge_options` are `hf_mudsc.merge`'s keywords.
    Under `torchrun`/`accelerate launch` only the main process gets the model; the others get None.
    """
    return merge([model_a, model_b], calibration, token=token, allow_pickle=allow_pickle, **merge_options)
