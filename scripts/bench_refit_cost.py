"""What auto-α + the refit add to a merge's time (issue 12's cost target), through `hf_mudsc.merge` end to end.

The parents and the calibration batches are `scripts/bench_merge.py`'s (B = A perturbed and permuted, batches
generated lazily): `--case minilm` (the default: the real MiniLM, random 64-token batches), `vit` (bench_merge's
ViT-S stand-in, random images) or `tiny` (a 2-layer hidden-32 ViT on 8x8 images: a smoke run in seconds). Each
configuration runs in its own child process (its peak RSS is its own). Configurations: `plain` (alpha 0.5, refit
none — the paper's merge, multi-start included) and `auto+refit` (alpha="auto", refit=`--refit`: by default the
library's default "auto", which resolves to the held-out gate here), plus `refit` alone (alpha 0.5) when `--all`.
`--refit ridge` measures the refit without the gate (the figures before the gate became the default).

    python scripts/bench_refit_cost.py --num-samples 512 --threads 1 --all  # the issue's measurement
    python scripts/bench_refit_cost.py --num-samples 64 --refit-samples 32  # a quick look
    python scripts/bench_refit_cost.py --case tiny --num-samples 32 --all    # smoke run (as its test)

Prints one JSON line per configuration, then the ratio (auto+refit) / plain of the merge seconds, wall and CPU (the
process's user + system time: with `--threads 1` it is what the wall time would be on a quiet machine, so the ratio
holds on a shared one).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types

# `--case tiny`: bench_merge's ViT shrunk until a merge takes about a second.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_channels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=8, patch_size=4)
CONFIGS = {"plain": {"alpha": 0.5, "refit": "none"}, "refit": {"alpha": 0.5}, "auto+refit": {"alpha": "auto"}}


def run_child(args: argparse.Namespace) -> dict:
    import bench_merge
    import torch

    import hf_mudsc

    if args.threads:
        torch.set_num_threads(args.threads)
    case = types.SimpleNamespace(noise=args.noise, batch_size=args.batch_size, parents=2,
                                 vit_image_size=8 if args.case == "tiny" else 64,
                                 vit_patch_size=4 if args.case == "tiny" else 8)
    if args.case == "tiny":
        from transformers import ViTConfig, ViTModel

        from hf_mudsc.architectures import spec_for

        torch.manual_seed(0)
        model_a = ViTModel(ViTConfig(**TINY_VIT)).eval()
        model_b = bench_merge.perturbed_permuted_copy(model_a, spec_for(model_a), seed=1, noise=args.noise)
    else:
        model_a, (model_b,), _ = bench_merge.load_case(args.case, case)
    batches = list(bench_merge.batches("minilm" if args.case == "minilm" else "vit", case, args.num_samples))
    options = {"refit": args.refit, **CONFIGS[args.child]}
    if options["refit"] != "none" and args.refit_samples is not None:
        options["refit_samples"] = args.refit_samples
    start, cpu = time.perf_counter(), time.process_time()
    merged = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", matcher=args.matcher, progress=False,
                            **options)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = merged.merge_report
    return {"config": args.child, "case": args.case, "merge_seconds": round(seconds, 2),
            "merge_cpu_seconds": round(cpu, 2),
            "refit_seconds": round(report.refit.seconds, 2) if report.refit is not None else 0.0,
            "refit_examples": report.refit.examples if report.refit is not None else 0,
            "parent_passes": report.refit.parent_passes if report.refit is not None else 0,
            "refit": merged.config.mudsc["refit"],
            "gate_kept": (merged.config.mudsc.get("refit_gate") or {}).get("kept"),
            "alpha": report.alpha, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "num_samples": args.num_samples, "options": {k: v for k, v in options.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="minilm", choices=["minilm", "vit", "tiny"])
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--refit-samples", type=int, default=None, help="default: the library's refit_samples")
    parser.add_argument("--matcher", default="zip", choices=["zip", "align"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--refit", default="auto", choices=["auto", "gate", "ridge", "repair"],
                        help="the refit of the refitted configurations (default: the library's default)")
    parser.add_argument("--all", action="store_true", help="also the refit alone (alpha 0.5)")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    rows = {}
    for name in ("plain", *(["refit"] if args.all else []), "auto+refit"):
        command = [sys.executable, __file__, "--child", name, *[a for a in sys.argv[1:] if a != "--all"]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(output)
        print(output, flush=True)
    for key, label in (("merge_seconds", "time"), ("merge_cpu_seconds", "CPU time")):
        ratio = rows["auto+refit"][key] / rows["plain"][key]
        print(f"merge {label} auto+refit / plain = {ratio:.2f} ({100 * (ratio - 1):+.0f}%; target: at most +100%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
