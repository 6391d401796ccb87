"""What auto-α + the refit add to a merge's time (issue 12's cost target), through `hf_mudsc.merge` end to end.

The parents and the calibration batches are `scripts/bench_merge.py`'s (B = A perturbed and permuted, batches
generated lazily): `--case minilm` (the default: the real MiniLM, random 64-token batches), `vit` (bench_merge's
ViT-S stand-in, random images) or `tiny` (a 2-layer hidden-32 ViT on 8x8 images: a smoke run in seconds). Each
configuration runs in its own child process (its peak RSS is its own). Configurations: `plain` (alpha 0.5, refit
none — the paper's merge, multi-start included) and `auto+refit` (alpha="auto", refit=`--refit`: by default the
library's default "auto", which resolves to the held-out gate here), plus `refit` alone (alpha 0.5) when `--all`.
`--refit ridge` measures the refit without the gate (the figures before the gate became the default).

`--baseline REV` also runs *today's merge* as issue 12 meant it: the default merge (mudsc zip, α 0.5, one start,
no refit) of the code at git revision REV — `d4c1fc9`, the last commit before the issue's first change — extracted
with `git archive` into a temporary folder and imported from there, on the same parents and batches; the ratio
(auto+refit) / baseline is then printed as well.

    python scripts/bench_refit_cost.py --num-samples 512 --threads 1 --all  # the issue's measurement
    python scripts/bench_refit_cost.py --num-samples 64 --refit-samples 32  # a quick look
    python scripts/bench_refit_cost.py --case tiny --num-samples 32 --all    # smoke run (as its test)
    python scripts/bench_refit_cost.py --num-samples 512 --threads 1 --baseline d4c1fc9  # against the issue's day

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
import tempfile
import time
import types
from pathlib import Path

# `--case tiny`: bench_merge's ViT shrunk until a merge takes about a second.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_channels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=8, patch_size=4)
CONFIGS = {"plain": {"alpha": 0.5, "refit": "none"}, "refit": {"alpha": 0.5}, "auto+refit": {"alpha": "auto"},
           "baseline": {"alpha": 0.5}}
# The code before issue 12 knew no refit, extra starts or auto-α: its default merge is α 0.5 with no other option.
BASELINE_OPTIONS = ("alpha",)


def run_child(args: argparse.Namespace) -> dict:
    if args.child == "baseline":  # the old tree's package and scripts shadow this checkout's
        sys.path[:0] = [args.baseline_tree, str(Path(args.baseline_tree) / "scripts")]
    import bench_merge
    import torch

    import hf_mudsc

    if args.child == "baseline" and not Path(hf_mudsc.__file__).resolve().is_relative_to(
            Path(args.baseline_tree).resolve()):
        raise SystemExit(f"the baseline run imported hf_mudsc from {hf_mudsc.__file__}, not {args.baseline_tree}")

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
        model_a, others, _ = bench_merge.load_case(args.case, case)
        # Before N parents, load_case returned the one copy itself.
        model_b = others[0] if isinstance(others, (list, tuple)) else others
    batches = list(bench_merge.batches("minilm" if args.case == "minilm" else "vit", case, args.num_samples))
    options = {"refit": args.refit, **CONFIGS[args.child]}
    if args.child == "baseline":
        options = {key: options[key] for key in BASELINE_OPTIONS}
    elif options["refit"] != "none" and args.refit_samples is not None:
        options["refit_samples"] = args.refit_samples
    start, cpu = time.perf_counter(), time.process_time()
    merged = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", matcher=args.matcher, progress=False,
                            **options)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = getattr(merged, "merge_report", None)
    refit = getattr(report, "refit", None)
    recorded = getattr(merged.config, "mudsc", None) or {}
    return {"config": args.child, "case": args.case, "merge_seconds": round(seconds, 2),
            "merge_cpu_seconds": round(cpu, 2),
            "refit_seconds": round(refit.seconds, 2) if refit is not None else 0.0,
            "refit_examples": refit.examples if refit is not None else 0,
            "parent_passes": refit.parent_passes if refit is not None else 0,
            "refit": recorded.get("refit", "none"),
            "gate_kept": (recorded.get("refit_gate") or {}).get("kept"),
            "alpha": getattr(report, "alpha", options["alpha"]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the default merge of the code at this git revision (issue 12: d4c1fc9)")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--baseline-tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tree:
        if args.baseline:
            extract(args.baseline, Path(tree))
        rows = {}
        names = ("plain", *(["refit"] if args.all else []), "auto+refit", *(["baseline"] if args.baseline else []))
        shared = ["--case", args.case, "--num-samples", str(args.num_samples), "--matcher", args.matcher,
                  "--batch-size", str(args.batch_size), "--noise", str(args.noise), "--threads", str(args.threads),
                  "--refit", args.refit,
                  *(["--refit-samples", str(args.refit_samples)] if args.refit_samples is not None else [])]
        for name in names:
            command = [sys.executable, __file__, "--child", name, *shared,
                       *(["--baseline-tree", tree] if name == "baseline" else [])]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows[name] = json.loads(output)
            print(output, flush=True)
    ratios = {f"{key}:{base}": rows["auto+refit"][key] / rows[base][key]
              for base in ("plain", *(["baseline"] if args.baseline else []))
              for key in ("merge_seconds", "merge_cpu_seconds")}
    print(json.dumps({"ratios": {k: round(v, 3) for k, v in ratios.items()}, "baseline": args.baseline}))
    print(f"{'auto+refit against':<44} {'wall':>6} {'CPU':>6}  (target: at most 2.00, i.e. +100 %)")
    for base, label in (("plain", "plain (this code: α 0.5, no refit)"),
                        ("baseline", f"baseline ({args.baseline}: its default merge)")):
        if base in rows:
            print(f"{label:<44} {ratios[f'merge_seconds:{base}']:>6.2f} {ratios[f'merge_cpu_seconds:{base}']:>6.2f}")
    return 0


def extract(revision: str, folder: Path) -> None:
    """The package and scripts of `revision` of this repository, written into `folder` by `git archive`."""
    repo = Path(__file__).resolve().parent.parent
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", revision, "hf_mudsc", "scripts"],
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        raise SystemExit(f"--baseline {revision}: git archive failed ({stderr.decode().strip() or error}); give a "
                         f"revision of this clone (issue 12's day: d4c1fc9)") from None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)


if __name__ == "__main__":
    sys.exit(main())
