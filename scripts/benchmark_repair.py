"""REPAIR (`refit="repair"`) against no refit and the ridge refit on the toy digit ViTs (docs/benchmarks/repair.md).

Per pair (the quality benchmark's builders: different init at --widths, same init at --same-init-widths, 5+5
digit splits): mudsc zip (α 0.5) merged once with `refit="none"`; then REPAIR at each scope of
`hf_mudsc.apply.repair.SCOPES` applied to a copy (256 examples, the default; mlp+ln and all also at 1024); the
default through `hf_mudsc.merge(refit="repair")`, timed end to end; then `refit="ridge"`. Joint and per-task test
accuracy, seconds of each refit.

    python scripts/benchmark_repair.py --widths 64 128 --same-init-widths 64 --splits 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    different_init_pair,
    digit_tasks,
    log,
    pair_settings,
    random_class_splits,
    same_init_pair,
    set_threads,
    write_json,
)

import hf_mudsc
from hf_mudsc.apply.repair import DEFAULT_SCOPE, SCOPES, repair_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.evaluate.harness import evaluate_merge

ZIP = {"method": "mudsc", "matcher": "zip", "alpha": 0.5}
MORE = 1024  # against the default `refit_samples="auto"` (256 examples): how many the moments need
FIGURES = ("joint", "average", "task_a", "task_b")


def run_pair(model_a: Any, model_b: Any, splits: Any, calibration: list[dict]) -> dict[str, Any]:
    """Every variant of one pair: test figures and seconds."""
    merged: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    base = hf_mudsc.merge([model_a, model_b], calibration, refit="none", progress=False, **ZIP)
    seconds["none"] = time.perf_counter() - start
    merged["none"] = base
    spec = spec_for(model_a)
    for scope in SCOPES:
        model = copy.deepcopy(base)
        report = repair_model(model, [model_a, model_b], spec, base.merge_report.matches, lambda: calibration,
                              scope=scope)
        merged[f"repair {scope}"] = model
        seconds[f"repair {scope} (repair only)"] = report.seconds
    for scope in SCOPES[1:]:
        model = copy.deepcopy(base)
        report = repair_model(model, [model_a, model_b], spec, base.merge_report.matches, lambda: calibration,
                              scope=scope, samples=MORE)
        merged[f"repair {scope} {MORE} examples"] = model
        seconds[f"repair {scope} {MORE} examples (repair only)"] = report.seconds
    start = time.perf_counter()
    merged["repair"] = hf_mudsc.merge([model_a, model_b], calibration, refit="repair", progress=False, **ZIP)
    seconds["repair"] = time.perf_counter() - start
    seconds["repair (repair only)"] = merged["repair"].merge_report.refit.seconds
    start = time.perf_counter()
    merged["ridge"] = hf_mudsc.merge([model_a, model_b], calibration, refit="ridge", progress=False, **ZIP)
    seconds["ridge"] = time.perf_counter() - start
    seconds["ridge (refit only)"] = merged["ridge"].merge_report.refit.seconds
    tests = digit_tasks(splits, "test")
    result = evaluate_merge(merged, [model_a, model_b], tests, progress=False)
    tasks = list(tests)

    def figures(name: str) -> dict[str, float]:
        return {"task_a": result.score(name, tasks[0]), "task_b": result.score(name, tasks[1]),
                "average": result.score(name, "average"), "joint": result.score(name, "joint")}

    rows = {name: figures(name) for name in ("parent_a", "parent_b", "ensemble", *merged)}
    return {"rows": rows, "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def summarise(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over pairs of every row's figures and every timing."""
    out: dict[str, Any] = {"rows": {}, "seconds": {}}
    for row in pairs[0]["rows"]:
        out["rows"][row] = {}
        for figure in FIGURES:
            values = [100 * p["rows"][row][figure] for p in pairs if p["rows"][row].get(figure) is not None]
            if values:
                out["rows"][row][figure] = [round(statistics.fmean(values), 1),
                                            round(statistics.pstdev(values), 1) if len(values) > 1 else 0.0]
    for key in pairs[0]["seconds"]:
        values = [p["seconds"][key] for p in pairs]
        out["seconds"][key] = [round(statistics.fmean(values), 2), round(statistics.pstdev(values), 2)]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for name, scenario in result["scenarios"].items():
        summary = scenario["summary"]
        lines += [f"### {name} ({len(scenario['pairs'])} pairs)", "",
                  "| row | joint | per-task avg | " + " | ".join(f"joint split {i}" for i in
                                                              range(len(scenario["pairs"]))) + " |",
                  "|---|---:|---:|" + "---:|" * len(scenario["pairs"])]
        def cell(figures: dict[str, list[float]], figure: str) -> str:
            return f"{figures[figure][0]:.1f} ± {figures[figure][1]:.1f}" if figure in figures else "–"

        for row, figures in summary["rows"].items():
            per_pair = " | ".join("–" if p["rows"][row].get("joint") is None else f"{100 * p['rows'][row]['joint']:.1f}"
                                  for p in scenario["pairs"])
            lines.append(f"| {row} | {cell(figures, 'joint')} | {cell(figures, 'average')} | {per_pair} |")
        lines += ["", "| seconds | mean ± std |", "|---|---:|"]
        lines += [f"| {key} | {v[0]:.2f} ± {v[1]:.2f} |" for key, v in summary["seconds"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 128], help="different-init widths")
    parser.add_argument("--same-init-widths", type=int, nargs="*", default=[64])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_results/repair/repair.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    settings = pair_settings()
    classes = random_class_splits(args.splits)
    result: dict[str, Any] = {"command": "python scripts/benchmark_repair.py " + " ".join(sys.argv[1:] if argv is None
                                                                                         else argv),
                              "default_scope": DEFAULT_SCOPE, "scenarios": {}}
    jobs = [(f"different init h{w}", different_init_pair, w) for w in args.widths]
    jobs += [(f"same init h{w}", same_init_pair, w) for w in args.same_init_widths]
    for name, build, width in jobs:
        pairs = []
        for index in range(args.splits):
            log(f"{name} split {index}")
            pairs.append({"split": index, "classes": classes[index],
                          **run_pair(*build(settings, width, index, classes[index]))})
            log("  joint: " + ", ".join(f"{row} {100 * figures['joint']:.1f}"
                                        for row, figures in pairs[-1]["rows"].items() if figures["joint"] is not None))
        result["scenarios"][name] = {"pairs": pairs, "summary": summarise(pairs)}
        write_json(Path(args.out), result)
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
