#!/usr/bin/env python
"""Is MuDSC ahead of the other methods by more than the spread? Paired differences over the benchmark's pairs.
(A benchmark reader, not a test; issue 12's third target.)

Reads a `quality.json` written by `scripts/benchmark_quality.py` and, for every scenario and width, compares one
row (default `mudsc zip`) with every other merged row on the SAME pairs: the per-pair difference of the joint
accuracy (row minus other), its mean ± std over pairs, how many pairs it wins, and the spread the issue names (the
std over pairs of the row's own joint accuracy). "Ahead by more than the spread" is read as mean difference > that
std; the paired std says whether the difference is consistent at all.

    python scripts/paired_differences.py docs/benchmarks/quality_default.json --row "mudsc zip"

Prints a JSON line and a table per scenario and width (percentage points).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NOT_MERGES = {"parent_a", "parent_b", "parent_c", "ensemble", "ensemble (softmax)"}


def differences(records: Sequence[dict[str, Any]], row: str, view: str = "joint") -> dict[str, Any]:
    """Per (scenario, width): `row`'s paired differences against every other merged row present on all pairs."""
    out: dict[str, Any] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["width"]), []).append(record)
    for (scenario, width), group in sorted(groups.items()):
        if not all(row in r["rows"] for r in group):
            continue
        own = [100 * r["rows"][row][view] for r in group]
        figures: dict[str, Any] = {"pairs": len(group), "row_mean": statistics.fmean(own),
                                   "row_std": statistics.stdev(own) if len(own) > 1 else 0.0, "against": {}}
        others = [name for name in group[0]["rows"] if name not in NOT_MERGES and name != row
                  and all(name in r["rows"] and r["rows"][name].get(view) is not None for r in group)]
        for other in others:
            diff = [100 * (r["rows"][row][view] - r["rows"][other][view]) for r in group]
            figures["against"][other] = {
                "mean": statistics.fmean(diff), "std": statistics.stdev(diff) if len(diff) > 1 else 0.0,
                "wins": sum(d > 0 for d in diff), "ties": sum(d == 0 for d in diff),
                "ahead_by_more_than_spread": statistics.fmean(diff) > figures["row_std"]}
        out[f"{scenario} {width}"] = figures
    return out


def table(result: dict[str, Any], row: str) -> str:
    lines = []
    for key, figures in result.items():
        lines += ["", f"{key}: {row} joint {figures['row_mean']:.1f} ± {figures['row_std']:.1f} over "
                  f"{figures['pairs']} pairs (the spread)", "",
                  f"| other row | {row} − other, mean ± std | wins / ties of {figures['pairs']} | ahead by > spread |",
                  "|---|---:|---:|---|"]
        for other, f in sorted(figures["against"].items(), key=lambda item: item[1]["mean"]):
            lines.append(f"| {other} | {f['mean']:+.1f} ± {f['std']:.1f} | {f['wins']} / {f['ties']} | "
                         f"{'yes' if f['ahead_by_more_than_spread'] else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quality_json", type=Path)
    parser.add_argument("--row", default="mudsc zip", help="the row compared with every other merged row")
    parser.add_argument("--view", default="joint", help="joint, task_a, task_b or average")
    args = parser.parse_args(argv)
    records = json.loads(args.quality_json.read_text(encoding="utf-8"))["records"]
    result = differences(records, args.row, args.view)
    print(json.dumps(result))
    print(table(result, args.row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
