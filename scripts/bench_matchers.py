#!/usr/bin/env python
"""Benchmark the matchers (docs/design.md §4.6): fast zip against the reference loop, group zip, align.

For each size n it builds the Pearson correlation of 2n planted features (model B = a noisy copy of A with
heads and units shuffled, the A units sharing latent factors so same-model pairs compete), casts it to
float32 as a real pipeline would, and times every matcher. The reference loops are only run up to
``--max-reference-n`` / ``--max-group-reference-n`` (they cost O(n^3)). Prints ONE JSON line, then a table.

    python scripts/bench_matchers.py --sizes 384 768 1536 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import common  # noqa: F401 - finds the library of this checkout when it is not installed
import numpy as np
import torch

from hf_mudsc.solve.matchers import Match, match, zip_reference


def planted_correlation(n: int, heads: int, samples: int, rng: np.random.Generator) -> torch.Tensor:
    """Pearson correlation (float32) of [A; B] where B is A's noisy copy, heads and units shuffled."""
    latent = max(8, n // 4)
    z = rng.standard_normal((latent, samples))
    a = rng.standard_normal((n, latent)) @ z / np.sqrt(latent) + 0.7 * rng.standard_normal((n, samples))
    g = n // heads
    perm = np.concatenate([h * g + rng.permutation(g) for h in rng.permutation(heads)])
    b = (a + 0.7 * rng.standard_normal((n, samples)))[perm]
    return torch.from_numpy(np.corrcoef(np.vstack([a, b])).astype(np.float32))


def timed(fn: Callable[[], Match], repeats: int) -> tuple[float, Match]:
    """Median wall time over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def same(a: Match, b: Match) -> bool:
    """Same clusters (as sets), same column order and the same value."""
    clusters = {frozenset(c) for c in a.clusters()} == {frozenset(c) for c in b.clusters()}
    return clusters and torch.equal(a.unmerge, b.unmerge) and a.value == b.value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 768, 1536], help="units per model")
    parser.add_argument("--heads", type=int, default=12, help="heads for the group matchers")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast matcher (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="runs per reference loop")
    parser.add_argument("--max-reference-n", type=int, default=1536, help="largest n for the zip reference")
    parser.add_argument(
        "--max-group-reference-n", type=int, default=768, help="largest n for the group zip reference"
    )
    parser.add_argument("--decay", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=2048, help="calibration samples behind each matrix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for n in args.sizes:
        if n % args.heads:
            parser.error(f"size {n} is not divisible by --heads {args.heads}")

    rng = np.random.default_rng(args.seed)
    zip_kw = {"decay": args.decay, "budget": args.budget}
    results = []
    for n in args.sizes:
        c = planted_correlation(n, args.heads, args.samples, rng)
        row: dict[str, object] = {"n": n, "heads": args.heads}
        row["zip_s"], fast = timed(lambda c=c: match(c, matcher="zip", **zip_kw), args.repeats)
        if n <= args.max_reference_n:
            row["zip_reference_s"], ref = timed(
                lambda c=c: zip_reference(c, **zip_kw), args.reference_repeats
            )
            row["zip_speedup"] = row["zip_reference_s"] / row["zip_s"]
            row["zip_agree"] = same(fast, ref)
        row["group_zip_s"], fast = timed(
            lambda c=c: match(c, matcher="zip", num_heads=args.heads, **zip_kw), args.repeats
        )
        if n <= args.max_group_reference_n:
            row["group_zip_reference_s"], ref = timed(
                lambda c=c: zip_reference(c, num_heads=args.heads, **zip_kw), args.reference_repeats
            )
            row["group_zip_speedup"] = row["group_zip_reference_s"] / row["group_zip_s"]
            row["group_zip_agree"] = same(fast, ref)
        row["align_s"], _ = timed(lambda c=c: match(c, matcher="align"), args.repeats)
        row["group_align_s"], _ = timed(
            lambda c=c: match(c, matcher="align", num_heads=args.heads), args.repeats
        )
        results.append(row)

    config = {key: value for key, value in vars(args).items()}
    config |= {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    print(json.dumps({"benchmark": "matchers", "config": config, "results": results}))

    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        return f"{value:.1f}x" if key.endswith("speedup") else f"{value:.3f}"

    columns = [
        ("n", "n"),
        ("zip_s", "zip s"),
        ("zip_reference_s", "zip ref s"),
        ("zip_speedup", "speedup"),
        ("zip_agree", "same"),
        ("group_zip_s", f"gzip({args.heads}) s"),
        ("group_zip_reference_s", "gzip ref s"),
        ("group_zip_speedup", "speedup"),
        ("group_zip_agree", "same"),
        ("align_s", "align s"),
        ("group_align_s", f"galign({args.heads}) s"),
    ]
    table = [[str(row["n"])] + [cell(row, key) for key, _ in columns[1:]] for row in results]
    widths = [max(len(title), *(len(line[i]) for line in table)) for i, (_, title) in enumerate(columns)]
    print("  ".join(title.rjust(w) for (_, title), w in zip(columns, widths, strict=True)))
    for line in table:
        print("  ".join(value.rjust(w) for value, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
