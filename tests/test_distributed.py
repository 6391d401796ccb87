"""Sharded calibration: two processes (accelerate.debug_launcher, gloo) give the single-process statistics and merge."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from accelerate import debug_launcher
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import CorrelationAccumulator
from hf_mudsc.calibrate.datasets import resolve_calibration
from hf_mudsc.calibrate.distributed import (
    all_reduce_accumulators,
    collect_statistics_distributed,
    is_main_process,
    process_info,
    shard_batches,
)
from hf_mudsc.errors import CalibrationError

ROWS = 44  # with batch size 8: shards of 22 rows -> batches 8, 8, 6 per process vs 8 x 5 + 4 in one process
USER_CUT = 30  # rows of the "stream_cut_by_user" scenario: the user's own take(), no num_samples


def parents():
    return make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)


def pixel_dataset() -> datasets.Dataset:
    pixels = torch.randn(ROWS, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": [i % 3 for i in range(ROWS)]})


def scenarios():
    """name -> (calibration, num_samples); the same inputs in and out of the launcher."""
    dataset = pixel_dataset()
    return {
        "dataset": (dataset, None),
        "dataset_subset": (dataset, 30),
        "streaming_subset": (dataset.to_iterable_dataset(num_shards=3), 30),
        # Cut by the user, 2 shards (the world size divides it): split by shards, each process read the first rows
        # of its own shard instead of its share of the stream's first 30 rows (distributed bug hunt D3).
        "stream_cut_by_user": (dataset.to_iterable_dataset(num_shards=2).take(USER_CUT), None),
        "batches": (make_batches("vit_cls", num_batches=5, batch_size=8, seed=2), 36),
    }


def expected_rows(name: str) -> int:
    """Samples a scenario's statistics hold: num_samples, the user's cut, or the whole dataset."""
    calibration, num_samples = scenarios()[name]
    return num_samples or (USER_CUT if name == "stream_cut_by_user" else ROWS)


def statistics(model_a, model_b, calibration, num_samples):
    spec = spec_for(model_a)
    stream = resolve_calibration(calibration, None, num_samples=num_samples, inputs=spec.inputs)
    accumulators = collect_statistics_distributed(model_a, model_b, spec, stream, batch_size=8,
                                                  num_samples=num_samples, required=spec.inputs, progress=False)
    return [torch.cat([t.flatten() for t in acc.tensors()]) for acc in accumulators]


def merged_state(model_a, model_b):
    merged = hf_mudsc.merge([model_a, model_b], pixel_dataset(), method="activation_align", batch_size=8,
                            progress=False)
    return None if merged is None else {k: v.clone() for k, v in merged.state_dict().items()}


def _two_process_run(out_dir):
    torch.set_num_threads(1)
    rank, world_size = process_info()
    model_a, model_b = parents()
    result = {"rank": rank, "world_size": world_size, "main": is_main_process()}
    result["statistics"] = {name: statistics(model_a, model_b, c, n) for name, (c, n) in scenarios().items()}
    result["merged"] = merged_state(model_a, model_b)
    said: list[str] = []  # what regmean's run logs on this process (its own data pass is not sharded)
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    library = logging.getLogger("hf_mudsc")
    level = library.level
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    try:
        regmean = hf_mudsc.merge([model_a, model_b], pixel_dataset(), method="regmean", refit="none", batch_size=8,
                                 progress=False)
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    result["regmean"] = None if regmean is None else {k: v.clone() for k, v in regmean.state_dict().items()}
    result["regmean_log"] = said
    # A batch that only rank 1 sees is broken: both processes must raise instead of waiting forever.
    broken = make_batches("vit_cls", num_batches=2, batch_size=4)
    broken[1]["pixel_values"] = broken[1]["pixel_values"][:, :, :8]
    try:
        hf_mudsc.merge([model_a, model_b], broken, method="activation_align", progress=False)
        result["error"] = None
    except CalibrationError as error:
        result["error"] = str(error)
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    debug_launcher(_two_process_run, args=(str(out_dir),), num_processes=2)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_single_process_defaults():
    assert process_info() == (0, 1) and is_main_process()
    accumulator = CorrelationAccumulator(3)
    accumulator.update(torch.randn(5, 3))
    before = [t.clone() for t in accumulator.tensors()]
    all_reduce_accumulators([accumulator])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(before, accumulator.tensors()))


def test_plain_batches_are_strided_after_the_global_cut():
    batches = make_batches("vit_cls", num_batches=5, batch_size=4)
    parts = [list(shard_batches(batches, rank, 2, batch_size=4, num_samples=18, columns=None, required=())[0])
             for rank in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    assert [b["pixel_values"].shape[0] for b in parts[0] + parts[1]] == [4, 4, 2, 4, 4]
    assert torch.equal(parts[1][0]["pixel_values"], batches[1]["pixel_values"])


@pytest.mark.parametrize("name", ["dataset_subset", "streaming_subset", "stream_cut_by_user"])
def test_dataset_shards_add_up_to_the_single_process_sample_set(name):
    calibration, num_samples = scenarios()[name]
    stream = resolve_calibration(calibration, None, num_samples=num_samples, inputs=("pixel_values",))

    def rows(part):
        return {tuple(x.flatten()[:4].tolist()) for b in part.batches(8) for x in b["pixel_values"]}

    whole = rows(stream)
    shards = [rows(stream.shard(rank, 2)) for rank in range(2)]
    assert len(whole) == expected_rows(name)
    assert shards[0] | shards[1] == whole and not shards[0] & shards[1]
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_two_processes_share_the_global_statistics(two_process_results):
    model_a, model_b = parents()
    assert [(r["rank"], r["world_size"], r["main"]) for r in two_process_results] == [(0, 2, True), (1, 2, False)]
    for name, (calibration, num_samples) in scenarios().items():
        single = statistics(model_a, model_b, calibration, num_samples)
        main, other = (r["statistics"][name] for r in two_process_results)
        for mine, yours, theirs in zip(main, other, single):
            assert torch.equal(mine, yours), name  # every process holds the same reduced sums
            # Same samples, other batch compositions: float32 activations agree to rounding.
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item()), name
            assert mine[-3:].tolist() == theirs[-3:].tolist(), name  # sample, example and repeat counts
        assert main[0][-2].item() == expected_rows(name), name  # residual stream: one sample per image


def test_two_process_merge_equals_single_process(two_process_results):
    single = merged_state(*parents())
    main, other = two_process_results
    assert other["merged"] is None  # only the main process solves and returns the model
    assert main["merged"].keys() == single.keys()
    for key, value in single.items():
        assert torch.allclose(main["merged"][key], value, atol=1e-6, rtol=0), key
    # The merge really moved weights (a merge equal to parent A would make the equality vacuous).
    assert not torch.allclose(main["merged"]["classifier.weight"], parents()[0].classifier.weight)


def test_failure_on_one_process_stops_both(two_process_results):
    main, other = two_process_results
    assert other["error"] and "pixel_values have shape (4, 1, 8, 16)" in other["error"]  # refused before a forward
    assert main["error"] and "another process" in main["error"]


def test_a_method_reading_its_own_data_says_the_other_processes_had_no_share(two_process_results):
    """QA s23: under a launcher, regmean's and fisher's own pass runs on the main process alone, while the others
    logged "statistics shared with the main process" without reading any data."""
    main, other = two_process_results
    assert other["regmean"] is None and main["regmean"] is not None
    assert not [line for line in other["regmean_log"] if "statistics shared" in line], other["regmean_log"]
    assert [line for line in other["regmean_log"]
            if "method regmean reads its calibration data on the main process alone" in line], other["regmean_log"]
    single = hf_mudsc.merge(list(parents()), pixel_dataset(), method="regmean", refit="none", batch_size=8,
                            progress=False)
    for key, value in single.state_dict().items():
        assert torch.equal(main["regmean"][key], value), key
