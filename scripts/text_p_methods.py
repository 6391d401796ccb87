"""Does the matching still matter once the refit runs, on a real model? Every unit-matching method and a position
merge, each with the default refit, on the permuted-basis MiniLM pairs (issue 12: "with the same refit and budget,
MuDSC ahead of plain averaging, ZipIt and activation matching by more than the spread over pairs").

On the 2-block digit toys every refitted merge lands within about a point of the others, position merges
included (docs/benchmarks/depth4.md, quality_default.md): the refit rebuilds two blocks from any start. This
benchmark asks the same question where a start cannot be rebuilt so easily: six-layer MiniLM fine-tunes whose
second parent is expressed in a permuted basis (`refit_text_pairs.py`'s text P pairs: the fine-tunes of
`bench_same_base.py`, parent B's units permuted with seed 7), so the true unit correspondence is known and a
position merge (regmean, linear) fuses unrelated units.

Each pair is merged by every method of `--methods` with the library's defaults otherwise (`refit="auto"`: the
gated ridge refit after unit-matching methods and after regmean) and by `mudsc zip` without the refit; scored per
task (argmax in the task's slice) and joint (each task's softmax, then the argmax: the library's rule). The
summary gives each row's mean ± std over pairs and the paired difference of `mudsc zip` against every other row.
(A benchmark, not a test.)

    cd scripts && python text_p_methods.py --seeds 0 --threads 1 --out ../docs/benchmarks/text_p_methods.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BENCH_CACHE, log, set_threads, write_json
from refit_text_pairs import ensemble_scores, task_scores

import hf_mudsc
from hf_mudsc.architectures import spec_for

# label -> merge options (everything else the library's default; `refit="auto"` unless set)
METHODS = {
    "mudsc zip": {"method": "mudsc", "matcher": "zip", "alpha": 0.5},
    "mudsc align": {"method": "mudsc", "matcher": "align", "alpha": 0.5},
    "zipit": {"method": "zipit"},
    "activation_align": {"method": "activation_align"},
    "weight_matching": {"method": "weight_matching"},
    "regmean": {"method": "regmean"},
    "linear": {"method": "linear"},
    "mudsc zip refit none": {"method": "mudsc", "matcher": "zip", "alpha": 0.5, "refit": "none"},
    # The paper's merges of the other matchers (issue 12: "report every method with and without refit")
    "zipit refit none": {"method": "zipit", "refit": "none"},
    "activation_align refit none": {"method": "activation_align", "refit": "none"},
    "weight_matching refit none": {"method": "weight_matching", "refit": "none"},
    # The LayerNorm refit (docs/benchmarks/refit_layernorm.md): with the default (gated) refit, and the ridge refit
    # ungated with and without it (the gate may drop either).
    "mudsc zip +norms": {"method": "mudsc", "matcher": "zip", "alpha": 0.5, "refit_norms": True},
    "mudsc zip refit ridge": {"method": "mudsc", "matcher": "zip", "alpha": 0.5, "refit": "ridge"},
    "mudsc zip refit ridge +norms": {"method": "mudsc", "matcher": "zip", "alpha": 0.5, "refit": "ridge",
                                     "refit_norms": True},
}
REFERENCE = "mudsc zip"
UNREFITTED = "mudsc zip refit none"
# `--methods`' default: every row but the LayerNorm-refit study's (asked for by name).
DEFAULT_METHODS = [label for label in METHODS if "+norms" not in label and label != "mudsc zip refit ridge"]


def run_pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench_same_base import text_setting

    from hf_mudsc.testing.permute import permute_model, random_permutations

    settings = argparse.Namespace(text_layers=6, text_epochs=3, text_lr=1e-4, max_length=16,
                                  calibration_samples=args.calibration_samples, quick=False,
                                  cache_dir=str(BENCH_CACHE / "same_base"))
    records = []
    for seed in args.seeds:
        setting = text_setting(settings, seed)
        for i, j in itertools.combinations(range(len(setting.parents)), 2):
            if args.pairs and f"{i},{j}" not in args.pairs:
                continue
            parents = [setting.parents[i], setting.parents[j]]
            spec = spec_for(parents[1])
            parents[1] = permute_model(parents[1], spec, random_permutations(spec, seed=7))
            tests = [setting.test[i], setting.test[j]]
            name = f"seed {seed} {setting.tasks[i]}+{setting.tasks[j]}"
            rows: dict[str, Any] = {"ensemble": ensemble_scores(parents, tests)}
            for label in args.methods:
                started = time.perf_counter()
                merged = hf_mudsc.merge(parents, setting.calibration, progress=False, **METHODS[label])
                rows[label] = task_scores(merged, parents, tests)
                refit = merged.config.mudsc.get("refit_gate") or {}
                rows[label].update(seconds=round(time.perf_counter() - started, 1),
                                   refit_kept=refit.get("kept"), method=merged.merge_report.method)
            records.append({"pair": name, "rows": rows})
            log(f"{name}: " + ", ".join(f"{label} {row['joint']:.1f}" for label, row in rows.items()))
            if args.out:
                write_json(Path(args.out), {"command": vars(args), "records": records})
    return records


def reference_of(label: str) -> str:
    """The mudsc zip row a row is paired with: the one with the same refit (the paper's merge for "refit none")."""
    return UNREFITTED if label.endswith(" refit none") else REFERENCE


def summary(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    def stats(values: Sequence[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}

    out: dict[str, Any] = {}
    for label in ["ensemble", *labels]:
        out[label] = {key: stats([r["rows"][label][key] for r in records]) for key in ("task_0", "task_1", "joint")}
        reference = reference_of(label)
        if label not in (reference, "ensemble") and reference in labels:
            diffs = [r["rows"][reference]["joint"] - r["rows"][label]["joint"] for r in records]
            out[label]["mudsc_zip_minus"] = {**stats(diffs), "wins": sum(d > 0 for d in diffs),
                                             "ties": sum(d == 0 for d in diffs)}
    return out


def markdown(result: dict[str, Any], labels: Sequence[str]) -> str:
    lines = ["| row | task A | task B | joint | mudsc zip − row (joint, paired; same refit) | mudsc zip ahead / tied |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in ["ensemble", *labels]:
        s = result[label]
        diff = s.get("mudsc_zip_minus")
        cells = [f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}" for k in ("task_0", "task_1", "joint")]
        lines.append(f"| {label} | {' | '.join(cells)} | "
                     + (f"{diff['mean']:+.1f} ± {diff['std']:.1f} | {diff['wins']} / {diff['ties']} of {diff['n']} |"
                        if diff else "– | – |"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pairs", nargs="*", help="only these task pairs, e.g. 0,1 2,3")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON of every pair and the summary")
    parser.add_argument("--markdown", metavar="JSON", help="print the table of a finished run and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as handle:
            done = json.load(handle)
        print(markdown(done["summary"], done["command"]["methods"]))
        return done
    set_threads(args.threads)
    started = time.perf_counter()
    records = run_pairs(args)
    result = {"command": vars(args), "records": records, "summary": summary(records, args.methods),
              "seconds": round(time.perf_counter() - started, 1)}
    if args.out:
        write_json(Path(args.out), result)
    print(markdown(result["summary"], args.methods))
    print(json.dumps({"benchmark": "text_p_methods", "pairs": len(records), "seconds": result["seconds"],
                      "joint": {k: round(v["joint"]["mean"], 2) for k, v in result["summary"].items()}}))
    return result


if __name__ == "__main__":
    main()
