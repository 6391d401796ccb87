#!/usr/bin/env python
"""Accuracy against parameters for every `size_spend`, from the size-budget runs already written (no merging).

`benchmark_quality.py --sizes` writes one `size_budget.json` per run; the spends and widths of
docs/benchmarks/size_residual.md came from several runs on the same pairs (the pair cache makes them the same
models). This joins their records per (width, split) — a row measured twice must agree, else the runs were not on
the same pairs and the script stops — and draws one panel per width: joint accuracy against parameters (× one
parent) for each spend, with and without the refit, and the ensemble (2.0×) as a dashed line.

    python scripts/size_spends_plot.py docs/benchmarks/size_budget.json docs/benchmarks/size_residual_*.json \
        --out docs/benchmarks/size_spends.png

Prints one JSON line (joint mean per width and row) and the table of `benchmark_quality.size_markdown`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmark_quality import SIZE_REFITS, size_markdown, summarise_sizes

SPENDS = ("mlp", "heads", "residual")
# Tolerance for one row measured by two runs (the figures are stored as floats from the same evaluation).
AGREE = 1e-9


def joined_records(paths: list[Path]) -> list[dict[str, Any]]:
    """One record per (width, split) with the rows of every run; a row two runs measured must agree."""
    joined: dict[tuple[int, int], dict[str, Any]] = {}
    for path in paths:
        for record in json.loads(path.read_text(encoding="utf-8"))["records"]:
            key = (record["width"], record["split"])
            entry = joined.setdefault(key, {**record, "rows": {}})
            for label, row in record["rows"].items():
                known = entry["rows"].get(label)
                if known is not None and not math.isclose(known["joint"], row["joint"], abs_tol=AGREE):
                    raise SystemExit(f"{path}: {label} at hidden {key[0]} split {key[1]} is {row['joint']} here and "
                                     f"{known['joint']} in an earlier file: not the same pairs")
                entry["rows"][label] = row
    return [joined[key] for key in sorted(joined)]


def spend_of(label: str) -> str:
    return next((spend for spend in SPENDS[1:] if f" {spend} " in label), "mlp")


def plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per width: a line per spend and refit through size 1 (the same merge for every spend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 4.4), squeeze=False)
    for ax, (width, table) in zip(axes[0], summary.items()):
        for color, spend in zip(("C0", "C1", "C2"), SPENDS):
            for refit in SIZE_REFITS:
                rows = [row for label, row in table.items() if label.startswith("size ")
                        and label.endswith(f"refit {refit}")
                        and (spend_of(label) == spend or label.startswith("size 1 "))]
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
        pairs = table["ensemble"]["joint"]["n"]
        ax.set_title(f"hidden {width} ({pairs} pairs)")
        ax.set_xlabel("parameters (× one parent)")
        ax.set_xlim(0.95, 2.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("joint accuracy, 10 digits (%)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Size budget by size_spend: different-init digit ViTs, mean ± std over pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="size_budget.json files of benchmark_quality.py --sizes")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    records = joined_records(args.runs)
    summary = summarise_sizes(records)
    plot(summary, args.out)
    print(json.dumps({"benchmark": "size_spends", "png": str(args.out), "pairs": len(records),
                      "joint_mean": {f"h{w}": {label: round(row["joint"]["mean"], 4) for label, row in t.items()}
                                     for w, t in summary.items()}}))
    print(size_markdown({"command": "python scripts/size_spends_plot.py " + " ".join(map(str, args.runs)),
                         "summary": summary}))


if __name__ == "__main__":
    main()
