"""`hf-mudsc demo`: the README's main job — two digit ViTs from different seeds, merged without training.

1. Two small ViTs are trained from different random seeds, A on digits 0-4 and B on digits 5-9 of
   scikit-learn's digits (16x16), or loaded from the cache of an earlier run.
2. The parents are exported as ordinary model folders (with an image processor that turns 8x8 digit images
   into their inputs) and the calibration images as a `save_to_disk` dataset, next to the cache — so the
   recipe written with the merged model re-runs the exact merge with `hf-mudsc merge --recipe`.
3. They are merged with MuDSC (zip and align) and every baseline, and every merge, both parents and their
   ensemble are evaluated per task and jointly (`hf_mudsc.evaluation`); the table is printed.
4. The MuDSC (zip) model is written to `./hf-mudsc-demo/` with its processor, model card (with the
   evaluation in its model-index), recipe and `eval_results.json` — into a temporary sibling folder that
   is renamed into place (`hf_mudsc.output`), so an interrupted run leaves nothing half-written.

Tiny models run fastest on one thread (thread start-up and spin-waiting cost more than the small matrix
products gain, dramatically so on a loaded machine), hence `--threads 1` by default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_mudsc.cli.arguments import path_text
from hf_mudsc.diagnostics import ADVICE, ALIGNED_RELATIONS
from hf_mudsc.errors import UsageError
from hf_mudsc.options import AUTO, REFITTING, number_or_auto
from hf_mudsc.publish.folder import check_location, check_output, read_marker, staged_output, unlisted_files
from hf_mudsc.testing.cache import cache_root

logger = logging.getLogger(__name__)

DEFAULT_CACHE = cache_root() / "demo"
# The largest --epochs and --hidden-size the demo trains: its toys take seconds at the defaults (30, 64); beyond
# these a run would train for hours, or fail only once the first layer is allocated (a width of millions).
MAX_EPOCHS = 1000
MAX_HIDDEN_SIZE = 1024
#: The demo's calibration set: the training images of both tasks (`toy.digit_splits`' 70 % of scikit-learn's 1797
#: digits, per class). For `--help`, which must not load the digits; a test keeps it equal to the set.
CALIBRATION_IMAGES = 1258
TASK_NAMES = ("digits-0-4", "digits-5-9")
CALIBRATION_BATCH = 64
DATASET_NAME = "sklearn digits"


PAPER_LABEL = "mudsc (zip), refit none"
REFIT_SUFFIX = " + refit"
ROW_NOTES = {
    "parent_a": "trained on digits 0-4 only: answers the other task's images with a digit of its own",
    "parent_b": "trained on digits 5-9 only",
    "ensemble": "both parents run side by side (twice the parameters and compute): the bar to reach",
    PAPER_LABEL: "the paper's merge (MuDSC zip, alpha 0.5) without the refit",
}
REFIT_NOTE = ("+ refit: then every linear layer refitted by ridge least squares toward the parents' outputs on "
              "the calibration images\n  (no labels, no gradients; refit='auto': the default for unit-matching "
              "methods and for regmean / regmean_plusplus / fisher, docs/design.md §4.9).\n  On these 2-block toys "
              "the refit rebuilds even a position merge (regmean, fisher), so they can lead here; on six-layer "
              "MiniLM\n  fine-tunes in a permuted basis regmean + refit falls to 50 % joint where mudsc + refit keeps "
              "76 %\n  (12 pairs, docs/benchmarks/matching_after_refit.md): the default is chosen for real models.")


def demo_methods() -> list[tuple[str, dict[str, Any]]]:
    """(label, merge options) of every registered method and matcher; the first is the model written out."""
    from hf_mudsc.methods import method_runs

    return method_runs()


def row_note(name: str, runs: list[tuple[str, dict[str, Any]]], labels: list[str]) -> str:
    """One line on what a row of the demo's table is: the parents, the ensemble, or a method (its registry
    description's first sentence, and the refit when it ran)."""
    from hf_mudsc.methods import get_method

    if name in ROW_NOTES:
        return ROW_NOTES[name]
    options = dict(runs[labels.index(name)][1]) if name in labels else {}
    if "method" not in options:
        return ""
    text = _first_clause(get_method(options["method"]).description)
    if options.get("matcher") and f"({options['matcher']})" not in name:
        text += f", {options['matcher']} matcher"
    return f"{text}, then the refit" if name.endswith(REFIT_SUFFIX) else text


def _first_clause(text: str) -> str:
    """The description up to its first ',', ';' or '.' outside parentheses: one short line per row."""
    depth = 0
    for index, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0 and char in ",;." and text[index + 1:index + 2] in (" ", ""):
            return text[:index]
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("-o", "--output", metavar="DIR", default="hf-mudsc-demo", type=path_text,
        help="folder for the MuDSC-merged model")
    add("--overwrite", action="store_true", help="replace an existing output folder")
    add("--hidden-size", type=int, default=64, metavar="N",
        help=f"width of the two ViTs (a multiple of 4, at most {MAX_HIDDEN_SIZE})")
    add("--epochs", type=int, default=30, metavar="N", help=f"training epochs per parent (at most {MAX_EPOCHS})")
    add("--seeds", type=int, nargs=2, default=(0, 1), metavar=("A", "B"),
        help="initialization seeds of A and B")
    add("--num-samples", type=int, default=512, metavar="N",
        help=f"calibration images (from both tasks; the set holds {CALIBRATION_IMAGES}: a larger N uses them all)")
    add("--alpha", type=number_or_auto, default=0.5, metavar="A",
        help="MuDSC balance factor (weight-space share), or 'auto' to choose it on held-out calibration images")
    add("--cache-dir", metavar="DIR", type=path_text, default=str(DEFAULT_CACHE),
        help="where trained parents and the calibration set are kept between runs")
    add("--threads", type=int, default=1, metavar="N", help="torch threads (tiny models: 1 is fastest)")


def digit_processor() -> Any:
    """The exported parents' image processor (`toy.digit_processor`: RGB, as the stock pipelines feed it)."""
    from hf_mudsc.testing import toy

    return toy.digit_processor()


def prepare_inputs(args: argparse.Namespace) -> tuple[Path, Path, Path, Any]:
    """Parent folders A and B, the calibration dataset folder and the digit splits (made once, cached)."""
    from hf_mudsc.testing import toy

    image_size = 16
    # format 2: parents exported as RGB models (toy.rgb_digit_model) that the stock pipelines can feed.
    settings = {"hidden": args.hidden_size, "epochs": args.epochs, "seeds": list(args.seeds),
                "size": image_size, "format": 2}
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    root = Path(args.cache_dir).expanduser().absolute() / f"pair-h{args.hidden_size}-{key}"
    folders = [root / name for name in TASK_NAMES]
    calibration = root / "calibration"
    splits = toy.digit_splits(image_size=image_size, num_channels=3)
    stale = {folder for folder, needed in [*((f, "config.json") for f in folders), (calibration, "state.json")]
             if not cached(folder, needed)}
    for folder in stale:  # a cache that cannot be written fails now, not after the training
        check_location(folder, flag="--cache-dir")
    if any(f in stale for f in folders):
        print(f"Training two ViTs (hidden {args.hidden_size}, {args.epochs} epochs) from seeds "
              f"{tuple(args.seeds)}: A on digits 0-4, B on digits 5-9 ...", flush=True)
        pair = toy.trained_digit_pair(seeds=tuple(args.seeds), hidden_size=args.hidden_size,
                                      epochs=args.epochs, image_size=image_size,
                                      cache_dir=Path(args.cache_dir).expanduser())
        processor = digit_processor()
        for folder, model in zip(folders, (pair.model_a, pair.model_b)):
            if folder in stale:
                with rebuilt(folder) as tmp:
                    toy.rgb_digit_model(model).save_pretrained(tmp)
                    processor.save_pretrained(tmp)
    else:
        print(f"Using the cached parents in {root}", flush=True)
    if calibration in stale:
        images = [task.train_pixel_values for task in splits.tasks]
        import torch

        dataset = toy.as_dataset(torch.cat(images))
        with rebuilt(calibration) as tmp:
            dataset.save_to_disk(str(tmp))
    return folders[0], folders[1], calibration, splits


def samples_used(asked: int, calibration: Path) -> int:
    """The calibration images the merges read: `asked`, or all the set holds when that is fewer — said once here
    (each of the demo's merges would warn), and recorded so in the recipe (the same rows: the whole set)."""
    import datasets

    held = datasets.load_from_disk(str(calibration)).num_rows
    if asked <= held:
        return asked
    logger.warning("--num-samples %d is more than the demo's calibration set holds (%d images): all %d are used",
                   asked, held, held)
    return held


class _OnPurpose(logging.Filter):
    """Drops the merges' advice to choose another method, data or option (`diagnostics.ADVICE`): the demo runs every
    baseline on the same data on purpose, and the user cannot pass it a method."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ADVICE, False)


@contextmanager
def deliberate_choices() -> Iterator[None]:
    """While the demo's merges run, the warnings that advise another choice of method, calibration data or option are
    not shown (they are kept in each merge's report and the written card); every other warning is."""
    from hf_mudsc import pipeline

    drop = _OnPurpose()
    pipeline.logger.addFilter(drop)
    try:
        yield
    finally:
        pipeline.logger.removeFilter(drop)


def relation_note(model: Any, seeds: tuple[int, int]) -> None:
    """Say once, in the demo's terms, what the merges' dropped method advice said that is true of the table: parents
    trained from one initialization are fine-tunes of one base, whose units already correspond."""
    relation = (model.config.mudsc.get("parent_relation") or {}).get("relation")
    if relation in ALIGNED_RELATIONS:
        logger.warning("--seeds %d %d: both parents start from one initialization, so their units already correspond "
                       "(%s): the unit-matching merges can only reorder them, and the position merges need no "
                       "matching; pass two different seeds for the paper's setting", *seeds, relation)


def cached(folder: Path, needed: str) -> bool:
    """Whether the cache entry `folder` can be used: the demo wrote it (its marker lists `needed`) and every file it
    wrote there is present and unchanged (a file the user added does not matter).

    An entry that cannot be used is rebuilt only when all it holds are files the demo wrote, unchanged (a file
    deleted, an interrupted write); anything else (a file truncated or edited, a folder the demo did not write) is
    refused here, before any training, since rebuilding it would delete files that are not the demo's own.

    Raises:
        FileExistsError: the entry is damaged and may not be replaced (the message names it and the fix).
    """
    if not os.path.lexists(folder):
        return False
    listed = (read_marker(folder) or {}).get("files", {})
    if needed in listed and all((folder / name).is_file() for name in listed) and not unlisted_files(
            folder, check_content=True)[1]:
        return True
    try:
        check_output(folder, overwrite=True, flag="--cache-dir")  # replaceable: only the demo's files, unchanged
    except FileExistsError as error:
        raise FileExistsError(f"the demo cache entry {str(folder)!r} cannot be used, and rebuilding it would delete "
                              f"what the demo did not write there ({error})") from None
    logger.warning("rebuilding the incomplete demo cache entry %s", folder)
    return False


def rebuilt(folder: Path) -> Any:
    """The staging folder of a cache entry: a damaged one (`cached`) is replaced; a new one is kept if another
    run finishes it first."""
    if os.path.lexists(folder):
        return staged_output(folder, overwrite=True, flag="--cache-dir")
    return staged_output(folder, keep_existing=True, flag="--cache-dir")


def run(args: argparse.Namespace) -> int:
    import torch

    output = Path(args.output).expanduser().absolute()
    # The cached parents and calibration set are the merge's inputs: never replaced by, nor holding, the output.
    check_output(output, overwrite=args.overwrite, inputs=[("demo cache (--cache-dir)", args.cache_dir)])
    if args.hidden_size < 4 or args.hidden_size % 4 or args.hidden_size > MAX_HIDDEN_SIZE:
        raise UsageError(f"--hidden-size must be a multiple of 4 (4 heads) from 4 to {MAX_HIDDEN_SIZE} (the demo's "
                         f"toys; the default is 64), got {args.hidden_size}")
    counts = (("--epochs", args.epochs), ("--num-samples", args.num_samples), ("--threads", args.threads))
    not_positive = [f"{flag} {value}" for flag, value in counts if value < 1]
    if not_positive:
        raise UsageError(f"{', '.join(not_positive)}: must be positive (the defaults: --epochs 30, --num-samples 512, "
                         "--threads 1)")
    if args.epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs {args.epochs} is more than the demo trains its toys for: pass at most "
                         f"{MAX_EPOCHS} (the default, 30, takes seconds)")
    cores = os.cpu_count() or 1
    if args.threads > cores:
        raise UsageError(f"--threads {args.threads} exceeds this machine's {cores} cores; pass at most {cores} "
                         "(tiny models: 1 is fastest)")
    for seed in args.seeds:
        try:
            torch.Generator().manual_seed(seed)  # torch's own range, not a copy of it
        except (ValueError, RuntimeError, OverflowError):
            raise UsageError(f"--seeds {seed} is not a seed torch accepts (a 64-bit integer); pass e.g. "
                             "--seeds 0 1") from None
    if args.alpha != AUTO and not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1] or be 'auto', got {args.alpha}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, output)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, output: Path) -> int:
    import hf_mudsc
    from hf_mudsc.evaluate.harness import evaluate_merge
    from hf_mudsc.evaluate.names import RESULTS_FILENAME
    from hf_mudsc.evaluate.tasks import TaskData
    from hf_mudsc.load.parents import load_parents
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe, pinned_choices
    from hf_mudsc.publish.writer import write_merged_folder
    from hf_mudsc.solve.diagnostics import PLOTS_FOLDER

    start = time.perf_counter()

    folder_a, folder_b, calibration, splits = prepare_inputs(args)
    parents = load_parents([str(folder_a), str(folder_b)])
    num_samples = samples_used(args.num_samples, calibration)
    recipe = Recipe(models=[str(folder_a), str(folder_b)], calibration=str(calibration), method="mudsc",
                    matcher="zip", alpha=args.alpha if args.alpha == AUTO else float(args.alpha),
                    num_samples=num_samples,
                    batch_size=CALIBRATION_BATCH, seed=0)
    merged = {}
    # Every registered method with its defaults (the refit runs where `refit="auto"` applies: unit matching), then
    # the paper's merge (no refit) for comparison; the first run is the default merge, the model written out.
    runs = [*demo_methods(), (PAPER_LABEL, {"method": "mudsc", "matcher": "zip", "refit": "none"})]
    print(f"Merging with {', '.join(label for label, _ in runs)} "
          f"({num_samples} calibration images) ...", flush=True)
    labels = []
    with deliberate_choices():
        for label, run_options in runs:
            options = recipe.override(**run_options).merge_options()
            model = hf_mudsc.merge(parents, str(calibration), **options, progress=False)
            if model.config.mudsc.get("refit") in REFITTING and (model.config.mudsc.get("refit_gate") or {}).get(
                    "kept", True):  # the refit ran and was kept (the gate may drop it)
                label += REFIT_SUFFIX
            merged[label] = model
            labels.append(label)
    relation_note(merged[labels[0]], tuple(args.seeds))
    tests = {task_name: TaskData((task.test_pixel_values, task.test_labels), name=DATASET_NAME, split="test")
             for task_name, task in zip(TASK_NAMES, splits.tasks)}
    result = evaluate_merge(merged, [p.model for p in parents], tests, progress=False)

    names = {"parent_a": "parent A (digits 0-4)", "parent_b": "parent B (digits 5-9)",
             "ensemble": "ensemble (A+B)", labels[0]: f"{labels[0]} (default)"}
    print("\nAccuracy on the digits test split (per task: argmax within the task's classes; joint: one of all "
          "10 classes,\neach task's softmax then the argmax, for the merges and the ensemble alike; average: mean "
          "of the per-task figures;\n'-': a single-task parent cannot answer the other task):\n")
    print(result.table(labels=names))
    print("\nRows:")
    for name in result.scores:
        print(f"  {names.get(name, name)}: {row_note(name, runs, labels)}")
    print(f"  {REFIT_NOTE}")

    best_label = labels[0]
    model = merged[best_label]
    # The recipe records what ran, as `hf-mudsc merge` writes it: the run's options, what `auto` resolved pinned.
    written = pinned_choices(recipe.override(**runs[0][1]), model)
    with staged_output(output, overwrite=args.overwrite) as staging:
        write_merged_folder(staging, model, recipe=written, parents=parents, processor=parents[0].processor,
                            eval_results=result.card_rows(best_label), model_name=output.name, evaluation=result)
        result.save(staging / RESULTS_FILENAME)
    plots = sorted(path.name for path in (output / PLOTS_FOLDER).glob("*.png"))
    # The commands below are pasted into the shell the demo ran in: they name the folder as it was given.
    given = shlex.quote(str(Path(args.output).expanduser()))
    recipe_path = shlex.quote(str(Path(args.output).expanduser() / RECIPE_FILENAME))
    print(f"\nThe {best_label} model is in {output}/ with its model card (README.md), recipe "
          f"({RECIPE_FILENAME}) and eval_results.json ({time.perf_counter() - start:.0f} s in total).\n"
          f"Its diagnostic plots are in {output / PLOTS_FOLDER}/ ({', '.join(plots)}); the card links them and "
          f"`hf-mudsc inspect {given}` summarises the merge.\n"
          "Load it with "
          "transformers.AutoModelForImageClassification.from_pretrained; re-run the merge (bit for bit: float sums "
          f"depend on the thread count, and the demo used {args.threads}) with\n"
          f"`OMP_NUM_THREADS={args.threads} hf-mudsc merge --recipe {recipe_path} --output merged`.")
    return 0
