#!/usr/bin/env python
"""Fine-tunes of one base trained far from it: does `method="auto"` still merge them well? (A benchmark, not a test;
docs/design.md §4.8, "The same-base choice is confirmed on the activations".)

A tiny BERT (2 layers, hidden 32) is trained from scratch on a synthetic TOPIC task (7 topics; the base), then
fine-tuned twice from it — SENTIMENT (2 classes) and TOPIC again (a new head) — with AdamW at `--lr` for `--steps`
steps. Trained until they learn sentiment, at any of the rates measured (1e-3 x 200 / 100 steps, 3e-4 x 800 / 400,
1e-4 x 2000 / 1000), the fine-tunes stay close in weight space ("shared base": relative weight distance 0.42-0.51)
but their units no longer correspond (docs/benchmarks/same_base_far.md). Each pair is merged without its base by

* `default` — `method="auto"` (with the data: the same-base choice confirmed by mudsc's solve);
* `regmean + gate` — what `auto` chose before the check (regmean, then the default refit: the gate);
* `linear + gate` — the other position merge, its refit forced to the gate (linear's default is none);
* `mudsc + gate` — unit matching with the default refit;

and each task is scored on its own slice of the merged (concatenated) head on held-out sentences. Mean over
`--seeds`; per-seed rows, the check's share of units left in place and what `auto` chose are recorded.

    python scripts/same_base_far.py --seeds 0 1 2 3 4 --threads 1                         # ~30 s a seed
    python scripts/same_base_far.py --seeds 0 1 2 3 4 --lr 1e-4 --steps 2000 1000 --threads 1

Outputs: one JSON summary line on stdout and a Markdown table; `--out` writes every record (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import log, set_threads, write_json

import hf_mudsc

TOPICS = {"sport": ["match", "goal", "team"], "food": ["soup", "bread", "cake"], "music": ["song", "band", "album"],
          "travel": ["trip", "flight", "hotel"], "tech": ["phone", "laptop", "app"],
          "film": ["movie", "actor", "scene"], "book": ["novel", "author", "chapter"]}
POSITIVE = ["great", "wonderful", "lovely", "superb", "fine", "pleasant"]
NEGATIVE = ["awful", "terrible", "boring", "dull", "poor", "bad"]
FILLER = ["the", "a", "this", "was", "is", "really", "very", "quite", "and", "i", "think", "it", "so"]
MAX_TOKENS = 16
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "regmean + gate": {"method": "regmean"},
    "linear + gate": {"method": "linear", "refit": "gate"},
    "mudsc + gate": {"method": "mudsc"},
}


def sentences(rng: np.random.Generator, count: int, task: str) -> tuple[list[str], list[int]]:
    """`count` sentences "<filler> the <noun> was <adverb> <adjective>"; labels: the topic or the sentiment."""
    texts, labels = [], []
    names = list(TOPICS)
    for _ in range(count):
        topic = int(rng.integers(len(names)))
        positive = int(rng.integers(2))
        noun = TOPICS[names[topic]][int(rng.integers(3))]
        adjective = (POSITIVE if positive else NEGATIVE)[int(rng.integers(6))]
        filler = " ".join(rng.choice(FILLER, size=int(rng.integers(0, 4))))
        texts.append(f"{filler} the {noun} was {rng.choice(['really', 'very', 'quite'])} {adjective}".strip())
        labels.append(positive if task == "sentiment" else topic)
    return texts, labels


def tokenizer() -> Any:
    """A word-level BERT tokenizer over the synthetic vocabulary (`tokenizers`; nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + [w for ws in TOPICS.values() for w in ws]))
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]", model_max_length=MAX_TOKENS)


def train_model(tok: Any, task: str, seed: int, *, steps: int, lr: float, base: Any = None) -> Any:
    """A tiny BERT classifier for `task`, from scratch or from `base` (its encoder; a new head)."""
    from transformers import BertConfig, BertForSequenceClassification

    names = ["negative", "positive"] if task == "sentiment" else list(TOPICS)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_TOKENS, num_labels=len(names),
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    if base is not None:
        model.load_state_dict({k: v for k, v in base.state_dict().items() if "classifier" not in k}, strict=False)
    texts, labels = sentences(np.random.default_rng(seed), 2000, task)
    encoded = tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    targets = torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(texts), (32,), generator=generator)
        loss = model(input_ids=encoded["input_ids"][pick], attention_mask=encoded["attention_mask"][pick],
                     labels=targets[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(model: Any, tok: Any, texts: list[str], labels: list[int], columns: slice) -> float:
    encoded = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[:, columns]
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One base, its two fine-tunes, every variant's merge scored per task."""
    import datasets

    tok = tokenizer()
    base = train_model(tok, "topic", 1000 + seed, steps=250, lr=2e-3)
    tasks = {"sentiment": (args.steps[0], 2000 + seed), "topic": (args.steps[1], 3000 + seed)}
    parents = {task: train_model(tok, task, task_seed, steps=steps, lr=args.lr, base=base)
               for task, (steps, task_seed) in tasks.items()}
    for task, model in parents.items():
        model.config._name_or_path = task
    tests = {task: sentences(np.random.default_rng(100 + seed + k), 300, task) for k, task in enumerate(tasks)}
    calibration = datasets.Dataset.from_dict({"text": sentences(np.random.default_rng(7 + seed), 200, "topic")[0]})
    record: dict[str, Any] = {"seed": seed, "parents": {task: accuracy(model, tok, *tests[task], slice(None))
                                                        for task, model in parents.items()}}
    for label, options in VARIANTS.items():
        merged = hf_mudsc.merge(list(parents.values()), calibration, processor=tok, progress=False, **options)
        ranges = merged.config.task_label_ranges
        record[label] = {task: accuracy(merged, tok, *tests[task], slice(*ranges[task])) for task in tasks}
        record[label]["method"] = merged.config.mudsc["method"]
        record[label]["refit"] = merged.config.mudsc["refit"]
        if label == "default":
            record["distance"] = merged.config.mudsc["parent_relation"]["weight_distance"]
            record["check"] = merged.config.mudsc["correspondence_check"]
        log(f"seed {seed}: {label:<15} " + " / ".join(f"{task} {record[label][task]:.3f}" for task in tasks)
            + f" ({record[label]['method']}, refit {record[label]['refit']})")
    return record


def means(records: Sequence[dict[str, Any]], label: str) -> dict[str, float]:
    """Each task's accuracy of row `label` ("parents" or a variant), mean over the seeds."""
    return {task: round(statistics.fmean(r[label][task] for r in records), 4) for task in records[0]["parents"]}


def chosen(records: Sequence[dict[str, Any]], label: str) -> list[str]:
    """The methods variant `label` merged with, over the seeds."""
    return sorted({r[label]["method"] for r in records})


def table(summary: dict[str, Any]) -> str:
    tasks = list(summary["parents"])
    rows = ["| row | " + " | ".join(tasks) + " | chosen |", "|---|" + "---:|" * len(tasks) + "---|"]
    for label in ("parents", *VARIANTS):
        cells = [f"{summary[label][task]:.3f}" for task in tasks]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(summary['chosen'].get(label, []))} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3, help="the fine-tunes' learning rate (AdamW)")
    parser.add_argument("--steps", type=int, nargs=2, default=[200, 100], metavar=("SENTIMENT", "TOPIC"),
                        help="the fine-tunes' steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write every record here (JSON)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    records = [run_seed(seed, args) for seed in args.seeds]
    summary = {"lr": args.lr, "steps": args.steps, "seeds": args.seeds,
               "distance": [round(r["distance"], 4) for r in records],
               "units_in_place": [None if r["check"] is None else r["check"]["units_in_place"] for r in records],
               **{label: means(records, label) for label in ("parents", *VARIANTS)},
               "chosen": {label: chosen(records, label) for label in VARIANTS}}
    print(json.dumps(summary))
    print(table(summary))
    if args.out:
        write_json(args.out, {"summary": summary, "records": records})
    return summary


if __name__ == "__main__":
    main()
