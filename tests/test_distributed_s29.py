"""A real `torchrun --nproc_per_node 2` on CPU, without ACCELERATE_USE_CPU (which `debug_launcher` sets and which
hid that a process's first `process_info()` saw a single process), plus the data splits of the distributed bug hunt.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed_s29.py OUT`) this module is the worker:
each process writes what it saw to OUT/rank{R}.json and the tests below read those files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

ROWS = 40


def pixel_dataset(rows: int = ROWS) -> datasets.Dataset:
    pixels = torch.randn(rows, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": [i % 3 for i in range(rows)]})


def labelled_by(model: torch.nn.Module, rows: int = ROWS) -> datasets.Dataset:
    """Rows whose first half is labelled with `model`'s own prediction and whose second half is not: the accuracy of
    the first k <= rows/2 rows is 1.0, and any row of the second half scored instead lowers it."""
    data = pixel_dataset(rows)
    with torch.no_grad():
        predicted = model(pixel_values=torch.as_tensor(data["pixel_values"])).logits.argmax(-1).tolist()
    labels = [p if i < rows // 2 else (p + 1) % 3 for i, p in enumerate(predicted)]
    return data.remove_columns("label").add_column("label", labels)


def _worker(out_dir: str) -> None:
    """One process of the 2-process launch: the library's first call in this process is a merge."""
    import logging

    from factories import make_model

    import hf_mudsc
    import hf_mudsc.calibrate.distributed as distributed
    from hf_mudsc.evaluate.harness import evaluate_merge

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    seen: list[tuple[int, int]] = []
    process_info = distributed.process_info

    def recorded() -> tuple[int, int]:
        seen.append(process_info())
        return seen[-1]

    distributed.process_info = recorded  # looked up at call time by is_main_process() and the harness
    rows_read: list[int] = []
    collect = distributed.collect_statistics

    def counting(model_a: Any, model_b: Any, spec: Any, batches: Any, **kwargs: Any) -> Any:
        batches = list(batches)
        rows_read.append(sum(int(next(iter(b.values())).shape[0]) for b in batches))
        return collect(model_a, model_b, spec, iter(batches), **kwargs)

    distributed.collect_statistics = counting
    parents = [make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)]
    result: dict[str, Any] = {"env_rank": int(os.environ["RANK"])}

    def attempt(name: str, run: Any) -> None:
        try:
            result[name] = run()
        except Exception as error:  # recorded for the test to show; both processes go on to the next part
            result[name] = {"error": f"{type(error).__name__}: {error}"}

    merged = hf_mudsc.merge(parents, pixel_dataset(), method="activation_align", batch_size=8, progress=False)
    result["first_process_info"] = list(seen[0])
    result["merge"] = {"returned_model": merged is not None, "rows_read": rows_read[:]}
    result["process_info_after"] = list(distributed.process_info())

    scored = labelled_by(parents[0])

    def stream_evaluation() -> Any:
        # 2 shards of 20 rows, num_samples=10: the stream's first 10 rows, all of shard 0
        outcome = evaluate_merge(parents[0], None, {"t": scored.to_iterable_dataset(num_shards=2)},
                                 metrics=["accuracy"], batch_size=4, num_samples=10, progress=False)
        return None if outcome is None else outcome.scores["merged"]["t"]

    attempt("stream_evaluation", stream_evaluation)

    def one_row_merge() -> Any:
        del rows_read[:]
        one = hf_mudsc.merge(parents, pixel_dataset(), method="activation_align", batch_size=8, num_samples=1,
                             progress=False)
        return {"returned_model": one is not None, "rows_read": rows_read[:]}

    attempt("one_row_merge", one_row_merge)

    def one_row_evaluation() -> Any:
        outcome = evaluate_merge(parents[0], None, {"t": scored.select(range(1))}, metrics=["accuracy"],
                                 batch_size=4, progress=False)
        return None if outcome is None else outcome.scores["merged"]["t"]

    attempt("one_row_evaluation", one_row_evaluation)

    def warning_of_another_share() -> Any:
        # Plain batches are strided: only batch 1, process 1's, holds pad ids (and no attention_mask).
        text_parents = [make_model("bert_cls", seed=0), make_model("bert_cls", seed=1)]
        pad = text_parents[0].config.pad_token_id
        generator = torch.Generator().manual_seed(0)
        batches = []
        for index in range(4):
            ids = torch.randint(pad + 1, text_parents[0].config.vocab_size, (8, 12), generator=generator)
            if index == 1:
                ids[:, 9:] = pad
            batches.append({"input_ids": ids})
        merged = hf_mudsc.merge(text_parents, batches, method="activation_align", batch_size=8, progress=False)
        return None if merged is None else merged.config.mudsc.get("warnings")

    attempt("warning_of_another_share", warning_of_another_share)
    Path(out_dir, f"rank{result['env_rank']}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    tests = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, str(out_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_the_first_call_in_a_process_sees_the_launch(torchrun_results):
    """D1: accelerate's PartialState() on a CUDA-less machine said (0, 1) on every process the first time."""
    for rank, result in enumerate(torchrun_results):
        assert result["first_process_info"] == [rank, 2]
        assert result["process_info_after"] == [rank, 2]


def test_the_first_merge_in_a_process_is_sharded_and_returns_on_rank_0_alone(torchrun_results):
    main, other = (result["merge"] for result in torchrun_results)
    assert main["returned_model"] and not other["returned_model"]
    assert main["rows_read"] == [ROWS // 2] and other["rows_read"] == [ROWS // 2]



def test_a_cut_stream_is_scored_on_the_same_rows_as_in_one_process(torchrun_results):
    """D2: 2 shards and num_samples=10 were split by shards after take(10): each process scored the first 5 rows of
    its own shard, so half the scored rows came from the second half (labelled against the model)."""
    main, other = (result["stream_evaluation"] for result in torchrun_results)
    assert other is None
    assert main == {"accuracy": 1.0}


def test_fewer_calibration_rows_than_processes_merge(torchrun_results):
    """D5: with num_samples=1 the second process has no row: it read none (datasets raised IndexError)."""
    main, other = (result["one_row_merge"] for result in torchrun_results)
    assert main == {"returned_model": True, "rows_read": [1]}
    assert other == {"returned_model": False, "rows_read": [0]}


def test_fewer_evaluation_rows_than_processes_are_scored(torchrun_results):
    main, other = (result["one_row_evaluation"] for result in torchrun_results)
    assert other is None
    assert main == {"accuracy": 1.0}  # row 0 is labelled with the model's prediction


def test_a_data_warning_of_another_process_share_is_recorded(torchrun_results):
    """D4: the pad-ids-without-attention_mask warning found only in process 1's batches was missing from the
    merged model's record (config.mudsc, hence the card), which the 1-process merge of the same data holds."""
    main, other = (result["warning_of_another_share"] for result in torchrun_results)
    assert other is None
    assert isinstance(main, list), main
    assert [text for text in main if "pad token id" in text], main

@pytest.mark.parametrize(("rows", "streaming"), [(0, False), (1, False), (2, False), (5, False), (1, True),
                                                (2, True), (5, True)])  # datasets cannot stream 0 rows
def test_process_shares_add_up_to_the_rows_even_when_some_are_empty(rows, streaming):
    from hf_mudsc.calibrate.datasets import process_share

    data = datasets.Dataset.from_dict({"x": list(range(rows))})
    if streaming:
        data = data.to_iterable_dataset(num_shards=max(rows, 1))
    shares = [[row["x"] for row in process_share(data, rank, 3)] for rank in range(3)]
    assert sorted(x for share in shares for x in share) == list(range(rows))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1

if __name__ == "__main__":
    _worker(sys.argv[1])
