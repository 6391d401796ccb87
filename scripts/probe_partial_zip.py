"""Probe (issue 12, the size target): partial zipping WITH the ridge refit carried through each parent's branch.

ZipIt's partial zipping shares the embeddings and the first `s` blocks (taken from the default merge at size 1,
its refit included), unmerges the merged residual stream into each parent's basis (`x_i[j] = x_m[cluster_i(j)]`,
the residual group's clusters) and runs deep copies of each parent's remaining blocks, final LayerNorm and head.
docs/research/size_budget_probe.md found no gain, but ran those branches with their original weights on inputs
they were never trained for. Here every linear layer of a branch is also refitted, in forward order, toward ITS
OWN parent's output of that layer on the same calibration examples as the default refit (its held-out split and
sample count, `RidgeAccumulator`, the default ridge λ), its inputs taken from the branched model itself.

Rows per pair: the ensemble, the default merge (size 1), `size=1.5, size_spend="heads"`, and the branched model
at s=1 (1.49×) without / with the branch refit and at s=0 (1.98×, embeddings shared only) with it. Joint: each
task's softmax, then the argmax (the ensemble's rule); per task: the argmax within the task's slice; the test split
of the benchmark's cached different-init digit ViT pairs (`common.different_init_pair`).

The "joint head" rows (session 15) separate the decision rule from the features: the same models scored by the
one-model merge's implicit rule ("centred": each task's logits centred per row, concatenated, then the argmax), and
the refitted branches read by ONE linear head over both branches' final CLS features (2h inputs, 10 outputs in
parent order) ridge-fitted like the default refit's concatenated head (`RidgeAccumulator`, λ `refit_lambda`, start
= the parents' heads laid block-diagonally, target `head_target`: both parents' centred logits) on the branch
refit's examples; it decides by the argmax over its outputs ("argmax") and is also scored by the per-task rule.
The old rows are computed as before. Results: docs/research/partial_zip_refit.md.

    cd scripts && python probe_partial_zip.py --widths 64 128 256 --splits 5 --threads 1 --out /tmp/pz.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    different_init_pair,
    log,
    pair_settings,
    random_class_splits,
    set_threads,
    write_json,
)
from torch import nn

import hf_mudsc
from hf_mudsc.apply.fidelity import holdout_split
from hf_mudsc.apply.refit import RidgeAccumulator, head_target, subset_batches
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.statistics import iter_batches
from hf_mudsc.options import MergeOptions

BATCH_SIZE = 64  # the benchmark's merge batch size
MERGE_SEED = 0  # `hf_mudsc.merge`'s default seed: it seeds the refit's subset of the calibration examples
ROWS = ["ensemble", "default size 1", "size 1.5 heads", "partial s=1, branches as is",
        "partial s=1, branch refit", "partial s=0, branch refit",
        # session 15: the decision rule apart from the features, and one joint head over both branches
        "ensemble, centred", "default size 1, centred", "size 1.5 heads, centred",
        "partial s=1, branch refit, centred", "partial s=0, branch refit, centred",
        "partial s=1, joint head", "partial s=0, joint head",
        "partial s=1, joint head, per task", "partial s=0, joint head, per task"]
RULES = ("per_task", "centred", "argmax")


class BranchedViT(nn.Module):
    """A shared prefix (embeddings and the first `s` blocks of a merged ViT) and, per parent, a gather from the
    merged residual basis into the parent's (ZipIt's unmerge) followed by copies of the parent's remaining blocks,
    final LayerNorm and classifier. `forward` returns each parent's logits (parent order)."""

    def __init__(self, merged: nn.Module, parents: Sequence[nn.Module], gathers: Sequence[torch.Tensor],
                 shared: int) -> None:
        super().__init__()
        self.shared = shared
        self.embeddings = copy.deepcopy(merged.vit.embeddings)
        self.prefix = nn.ModuleList(copy.deepcopy(list(merged.vit.layers[:shared])))
        for index, gather in enumerate(gathers):
            self.register_buffer(f"gather{index}", gather.clone(), persistent=True)
        self.branches = nn.ModuleList(
            nn.ModuleDict({"layers": nn.ModuleList(copy.deepcopy(list(parent.vit.layers[shared:]))),
                           "layernorm": copy.deepcopy(parent.vit.layernorm),
                           "classifier": copy.deepcopy(parent.classifier)})
            for parent in parents)

    def branch_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for layer in self.prefix:
            hidden = layer(hidden)
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.branch_input(pixel_values)
        return [self.run_branch(index, hidden) for index in range(len(self.branches))]

    def run_branch(self, index: int, merged_hidden: torch.Tensor) -> torch.Tensor:
        return self.branches[index]["classifier"](self.branch_features(index, merged_hidden))

    def branch_features(self, index: int, merged_hidden: torch.Tensor) -> torch.Tensor:
        """Branch `index`'s final-LayerNorm CLS features (what its classifier reads), in its parent's basis."""
        branch = self.branches[index]
        hidden = merged_hidden[..., getattr(self, f"gather{index}")]
        for layer in branch["layers"]:
            hidden = layer(hidden)
        return branch["layernorm"](hidden)[:, 0]


class JointHeadViT(nn.Module):
    """A branched model's shared prefix and branches up to their final LayerNorms (their own classifiers dropped),
    read by one linear head over the concatenated CLS features of every branch (parent order). `forward` returns
    the head's logits (all tasks' labels, parent order)."""

    def __init__(self, branched: BranchedViT, head: nn.Linear) -> None:
        super().__init__()
        self.branched = copy.deepcopy(branched)
        for branch in self.branched.branches:
            branch["classifier"] = nn.Identity()
        self.head = head

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.branched.branch_input(pixel_values)
        return torch.cat([self.branched.branch_features(index, hidden)
                          for index in range(len(self.branched.branches))], dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def linear_pairs(model: BranchedViT, index: int, parent: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(branch layer, the parent's same layer) for every linear layer of branch `index`, in forward order (the ViT
    block defines its layers in the order they run: q, k, v, o, fc1, fc2; then the classifier)."""
    branch = model.branches[index]
    pairs: list[tuple[nn.Linear, nn.Linear]] = []
    for mine, theirs in zip(branch["layers"], parent.vit.layers[model.shared:], strict=True):
        pairs += [(a, b) for a, b in zip(mine.modules(), theirs.modules(), strict=True) if isinstance(a, nn.Linear)]
    return [*pairs, (branch["classifier"], parent.classifier)]


def captured(module: nn.Module, run: Callable[[], Any], where: str) -> torch.Tensor:
    """The first input (`where="input"`) or the output of `module` while `run()` computes."""
    found: list[torch.Tensor] = []
    if where == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: found.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: found.append(out.detach()))
    try:
        run()
    finally:
        handle.remove()
    return found[0]


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def refit_branches(model: BranchedViT, parents: Sequence[nn.Module],
                   batches: Callable[[], Iterable[Mapping[str, Any]]], lambda_rel: float) -> int:
    """Every branch linear layer, in forward order, by the default refit's ridge least squares toward its own
    parent's output of that layer; inputs from the branched model (earlier branch layers already refitted).
    Returns the examples read per pass."""
    examples = 0
    with torch.no_grad():
        for index, parent in enumerate(parents):
            for mine, theirs in linear_pairs(model, index, parent):
                accumulator = RidgeAccumulator(mine.in_features, mine.out_features, mine.bias is not None)
                examples = 0
                for batch in batches():
                    pixels = batch["pixel_values"]
                    examples += len(pixels)
                    hidden = model.branch_input(pixels)
                    inputs = captured(mine, lambda h=hidden, i=index: model.run_branch(i, h), "input")
                    targets = captured(theirs, lambda x=pixels, p=parent: p(pixel_values=x), "output")
                    accumulator.update(rows_of(inputs), rows_of(targets))
                weight, bias, _ = accumulator.solve(mine.weight, mine.bias, lambda_rel)
                mine.weight.copy_(weight.to(mine.weight))
                if bias is not None:
                    mine.bias.copy_(bias.to(mine.bias))
    return examples


def fit_joint_head(model: BranchedViT, parents: Sequence[nn.Module],
                   batches: Callable[[], Iterable[Mapping[str, Any]]], lambda_rel: float) -> nn.Linear:
    """One linear head over the concatenated CLS features of every branch, fitted as the default refit fits a
    concatenated head: ridge least squares (`RidgeAccumulator`, λ relative) toward `head_target` (each parent's
    logits centred per task, parent order), starting from the parents' heads laid block-diagonally."""
    widths = [b["classifier"].in_features for b in model.branches]
    heads = [p.classifier for p in parents]
    head = nn.Linear(sum(widths), sum(h.out_features for h in heads))
    with torch.no_grad():
        head.weight.copy_(torch.block_diag(*[h.weight for h in heads]))
        head.bias.copy_(torch.cat([h.bias for h in heads]))
        accumulator = RidgeAccumulator(head.in_features, head.out_features, bias=True)
        for batch in batches():
            pixels = batch["pixel_values"]
            hidden = model.branch_input(pixels)
            features = torch.cat([model.branch_features(index, hidden) for index in range(len(parents))], dim=-1)
            accumulator.update(features, head_target([p(pixel_values=pixels).logits for p in parents]))
        weight, bias, _ = accumulator.solve(head.weight, head.bias, lambda_rel)
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    return head


def scores(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], rule: str = "per_task",
           ) -> dict[str, float]:
    """Joint accuracy over every task's test images under `rule`, and each task's accuracy within its own slice.
    Rules: "per_task" (each task's softmax, concatenated, then the argmax over all classes: the ensemble's and the
    benchmark's rule), "centred" (each task's logits minus their row mean, concatenated, then the argmax: the rule
    a concatenated head refitted toward `head_target` is fitted to), "argmax" (the argmax over the concatenated
    logits as they are). `logits[t]`: task t's slice of the head on all test images (tasks' images in order);
    `labels[t]`: task t's labels."""
    sizes = [len(y) for y in labels]
    widths = [z.shape[1] for z in logits]
    offsets = [sum(widths[:t]) for t in range(len(widths))]
    joint_labels = torch.cat([y + offsets[t] for t, y in enumerate(labels)])
    if rule == "per_task":
        decided = torch.cat([z.softmax(-1) for z in logits], -1)
    elif rule == "centred":
        decided = head_target(logits)
    elif rule == "argmax":
        decided = torch.cat(list(logits), -1)
    else:
        raise ValueError(f"unknown joint rule {rule!r}; use one of {RULES}")
    row = {"joint": float((decided.argmax(-1) == joint_labels).float().mean())}
    start = 0
    for t, (z, y) in enumerate(zip(logits, labels, strict=True)):
        row[f"task_{'ab'[t]}"] = float((z[start:start + sizes[t]].argmax(-1) == y).float().mean())
        start += sizes[t]
    return row


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_pair(args: argparse.Namespace, width: int, split_index: int, classes: Any) -> dict[str, Any]:
    settings = pair_settings(widths=[width])
    model_a, model_b, splits, calibration = different_init_pair(settings, width, split_index, classes)
    parents = [model_a.eval(), model_b.eval()]
    images = torch.cat([t.test_pixel_values for t in splits.tasks])
    labels = [torch.as_tensor(t.test_labels) for t in splits.tasks]
    widths = [p.config.num_labels for p in parents]
    one = parameters(model_a)
    rows: dict[str, Any] = {}

    def merged_logits(model: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            logits = model(pixel_values=images).logits
        return list(logits.split(widths, dim=1))

    with torch.no_grad():
        parent_logits = [p(pixel_values=images).logits for p in parents]
    rows["ensemble"] = {**scores(parent_logits, labels), "parameter_ratio": 2.0}
    rows["ensemble, centred"] = {**scores(parent_logits, labels, "centred"), "parameter_ratio": 2.0}
    start = time.perf_counter()
    default = hf_mudsc.merge(parents, calibration, batch_size=BATCH_SIZE, progress=False)
    rows["default size 1"] = {**scores(merged_logits(default), labels), "parameter_ratio": parameters(default) / one,
                              "seconds": round(time.perf_counter() - start, 2)}
    rows["default size 1, centred"] = {**scores(merged_logits(default), labels, "centred"),
                                       "parameter_ratio": parameters(default) / one}
    start = time.perf_counter()
    heads = hf_mudsc.merge(parents, calibration, batch_size=BATCH_SIZE, progress=False, size=1.5,
                           size_spend="heads")
    rows["size 1.5 heads"] = {**scores(merged_logits(heads), labels), "parameter_ratio": parameters(heads) / one,
                              "seconds": round(time.perf_counter() - start, 2)}
    rows["size 1.5 heads, centred"] = {**scores(merged_logits(heads), labels, "centred"),
                                       "parameter_ratio": parameters(heads) / one}
    del heads

    spec = spec_for(model_a)
    residual = default.merge_report.matches[spec.group_index("residual")]
    n = model_a.config.hidden_size
    gathers = [residual.cluster_of[:n].cpu(), residual.cluster_of[n:].cpu()]
    gate = default.config.mudsc.get("refit_gate") or {}
    samples = default.merge_report.refit.samples if default.merge_report.refit is not None else None
    # The default refit's examples: the gate's kept split (every 5th held out), then `refit_samples`' subset.
    kept, _ = holdout_split(lambda: iter_batches(calibration, batch_size=BATCH_SIZE))
    refit_data = subset_batches(lambda: kept, samples, seed=MERGE_SEED)
    lambda_rel = MergeOptions.refit_lambda

    def branched_row(shared: int, refit: bool) -> tuple[dict[str, Any], BranchedViT, list[torch.Tensor]]:
        start = time.perf_counter()
        model = BranchedViT(default, parents, gathers, shared).eval()
        examples = refit_branches(model, parents, refit_data, lambda_rel) if refit else 0
        with torch.no_grad():
            logits = model(images)
        return ({**scores(logits, labels), "parameter_ratio": parameters(model) / one,
                 "branch_refit_examples": examples, "seconds": round(time.perf_counter() - start, 2)}, model, logits)

    def joint_head_rows(shared: int, branched: BranchedViT) -> None:
        """The refitted branches read by one head over both branches' features (its own argmax; per-task rule)."""
        start = time.perf_counter()
        model = JointHeadViT(branched, fit_joint_head(branched, parents, refit_data, lambda_rel)).eval()
        with torch.no_grad():
            logits = list(model(images).split(widths, dim=1))
        extra = {"parameter_ratio": parameters(model) / one, "seconds": round(time.perf_counter() - start, 2)}
        rows[f"partial s={shared}, joint head"] = {**scores(logits, labels, "argmax"), **extra}
        rows[f"partial s={shared}, joint head, per task"] = {**scores(logits, labels), **extra}

    rows["partial s=1, branches as is"] = branched_row(1, refit=False)[0]
    for shared in (1, 0):
        row, branched, logits = branched_row(shared, refit=True)
        rows[f"partial s={shared}, branch refit"] = row
        rows[f"partial s={shared}, branch refit, centred"] = {
            **scores(logits, labels, "centred"), "parameter_ratio": row["parameter_ratio"]}
        joint_head_rows(shared, branched)
    return {"width": width, "split": split_index, "classes": [list(c) for c in classes],
            "parent_parameters": one, "default_refit_kept": gate.get("kept"), "refit_samples": samples,
            "rows": rows}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over pairs of every row's joint / per-task accuracy and parameter ratio, per width."""
    summary: dict[str, Any] = {}
    for width in sorted({r["width"] for r in records}):
        mine = [r for r in records if r["width"] == width]
        summary[str(width)] = {
            label: {key: {"mean": statistics.fmean(r["rows"][label][key] for r in mine),
                          "std": statistics.stdev([r["rows"][label][key] for r in mine]) if len(mine) > 1 else 0.0,
                          "n": len(mine)}
                    for key in ("joint", "task_a", "task_b", "parameter_ratio")}
            for label in ROWS}
    return summary


def paired(records: Sequence[dict[str, Any]], row: str, other: str) -> dict[str, dict[str, Any]]:
    """Per width: `row` minus `other` in joint points on the same pairs (split order), mean ± std over pairs."""
    out: dict[str, dict[str, Any]] = {}
    for width in sorted({r["width"] for r in records}):
        mine = sorted((r for r in records if r["width"] == width), key=lambda r: r["split"])
        diffs = [100 * (r["rows"][row]["joint"] - r["rows"][other]["joint"]) for r in mine]
        out[str(width)] = {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                           "pairs": diffs}
    return out


DIFFERENCES = [(row, other) for row in ("partial s=1, joint head", "partial s=1, joint head, per task",
                                        "partial s=0, joint head", "partial s=0, joint head, per task",
                                        "partial s=1, branch refit, centred")
               for other in ("ensemble", "ensemble, centred", "size 1.5 heads")] + [
    ("ensemble, centred", "ensemble"), ("default size 1, centred", "default size 1"),
    ("partial s=1, joint head", "partial s=1, branch refit, centred")]


def difference_table(records: Sequence[dict[str, Any]]) -> str:
    widths = sorted({r["width"] for r in records})
    lines = ["| difference | " + " | ".join(f"h{w}" for w in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for row, other in DIFFERENCES:
        cells = []
        for found in paired(records, row, other).values():
            per_pair = " ".join(f"{d:+.1f}" for d in found["pairs"])
            cells.append(f"{found['mean']:+.2f} ± {found['std']:.2f} ({per_pair})")
        lines.append(f"| {row} − {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: Mapping[str, Any], records: Sequence[dict[str, Any]]) -> str:
    lines = ["| hidden | row | params × | joint % | task A % | task B % | joint per pair |",
             "|---|---|---|---|---|---|---|"]
    for width, rows in summary.items():
        for label in ROWS:
            row = rows[label]
            pairs = " / ".join(f"{100 * r['rows'][label]['joint']:.1f}" for r in records if str(r["width"]) == width)
            lines.append(f"| {width} | {label} | {row['parameter_ratio']['mean']:.2f} | "
                         f"{100 * row['joint']['mean']:.1f} ± {100 * row['joint']['std']:.1f} | "
                         f"{100 * row['task_a']['mean']:.1f} | {100 * row['task_b']['mean']:.1f} | {pairs} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=5, help="the first N class splits (benchmark's pairs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every pair's rows and the summary")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    splits = random_class_splits(args.splits)
    records = []
    for width in args.widths:
        for index, classes in enumerate(splits):
            start = time.perf_counter()
            records.append(run_pair(args, width, index, classes))
            joint = {label: round(100 * row["joint"], 1) for label, row in records[-1]["rows"].items()}
            log(f"h{width} split {index} ({time.perf_counter() - start:.0f} s): {joint}")
    summary = summarise(records)
    result = {"probe": "partial_zip_refit", "widths": args.widths, "splits": args.splits, "summary": summary,
              "pairs": records,
              "differences": {f"{row} - {other}": paired(records, row, other) for row, other in DIFFERENCES}}
    if args.out is not None:
        write_json(args.out, result)
    print(json.dumps({"summary": summary}))
    print(table(summary, records))
    print(difference_table(records))


if __name__ == "__main__":
    main()
