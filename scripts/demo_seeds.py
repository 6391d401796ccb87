"""The demo's table over several seed pairs: is the default's place among the baselines the demo's luck?

`hf-mudsc demo` trains two digit ViTs from two seeds (0 and 1) and prints one row per method. One pair is one draw;
this runs the demo for `--pairs` seed pairs (0 1, 2 3, ...; each in its own process, as a user runs it), parses
each printed table and reports every row's joint accuracy as mean ± std over the pairs, and its paired difference
against the default row (mean ± std, and on how many pairs it is ahead).

    python scripts/demo_seeds.py --pairs 10 --out demo_seeds.json     # ~8 min on 2 cores (trains 20 parents)
    python scripts/demo_seeds.py --pairs 2 --epochs 2                  # a smoke run

Prints one JSON line (every row's per-pair figures) and a readable table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("demo_seeds")

DEFAULT_ROW = "mudsc (zip) + refit (default)"


def parse_table(text: str) -> dict[str, float]:
    """Row name -> joint accuracy, from the demo's printed table (`| row | task A | task B | joint | avg |`)."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| model") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        try:
            rows[cells[0]] = float(cells[3])
        except (IndexError, ValueError):
            continue
    return rows


def run_demo(seeds: tuple[int, int], epochs: int | None, cache_dir: Path, scratch: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "hf_mudsc", "demo", "--seeds", str(seeds[0]), str(seeds[1]), "--output",
               str(scratch / f"demo_{seeds[0]}_{seeds[1]}"), "--cache-dir", str(cache_dir), "--overwrite"]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the demo with seeds {seeds} failed: {done.stderr.strip()[-500:]}")
    return parse_table(done.stdout)


def summarise(per_pair: list[dict[str, float]]) -> list[dict[str, object]]:
    """Every row present in all pairs: mean ± std of its joint accuracy and its paired difference to the default."""
    base = [pair[DEFAULT_ROW] for pair in per_pair]
    names = [name for name in per_pair[0] if all(name in pair for pair in per_pair)]
    summary = []
    for name in names:
        values = [pair[name] for pair in per_pair]
        diffs = [value - b for value, b in zip(values, base, strict=True)]
        spread = statistics.stdev if len(values) > 1 else (lambda _: 0.0)
        summary.append({"row": name, "joint_mean": statistics.mean(values), "joint_std": spread(values),
                        "minus_default_mean": statistics.mean(diffs), "minus_default_std": spread(diffs),
                        "ahead_of_default": sum(d > 0 for d in diffs), "pairs": len(values)})
    return sorted(summary, key=lambda row: -row["joint_mean"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10, help="seed pairs (0 1), (2 3), ...")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per parent (default: the demo's)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="trained parents kept between runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        per_pair = []
        for index in range(args.pairs):
            seeds = (2 * index, 2 * index + 1)
            per_pair.append(run_demo(seeds, args.epochs, cache, Path(scratch)))
            logger.info("seeds %s: default %.4f", seeds, per_pair[-1].get(DEFAULT_ROW, float("nan")))
    summary = summarise(per_pair)
    record = {"pairs": [[2 * i, 2 * i + 1] for i in range(args.pairs)], "joint_per_pair": per_pair,
              "summary": summary}
    print(json.dumps(record))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n| row | joint (mean ± std over {args.pairs} pairs) | minus default (paired) | ahead of default |")
    print("|---|---:|---:|---:|")
    for row in summary:
        print(f"| {row['row']} | {row['joint_mean']:.4f} ± {row['joint_std']:.4f} | "
              f"{row['minus_default_mean']:+.4f} ± {row['minus_default_std']:.4f} | "
              f"{row['ahead_of_default']}/{row['pairs']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
