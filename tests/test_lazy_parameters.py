"""`LazyParameters`: a checkpoint's tensors read one at a time, on access, never cached (the streaming merge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import fine_tune, make_model
from safetensors.torch import save_file

import hf_mudsc.load.lazy as lazy
from hf_mudsc.load.lazy import LazyParameters, lazy_parameters, safetensors_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.full((4,), 2.5, dtype=torch.float16),
               "ids": torch.tensor([1, 2, 3])}
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def test_keys_and_shapes_come_from_the_header_and_no_tensor_is_read_until_asked(checkpoint, monkeypatch):
    folder, tensors = checkpoint
    read: list[str] = []
    real_open = lazy.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            handle = self.handle.__enter__()
            outer = self

            class Handle:
                def keys(self):
                    return handle.keys()

                def get_slice(self, name):
                    return handle.get_slice(name)

                def get_tensor(self, name):
                    read.append(name)
                    return handle.get_tensor(name)

            outer.wrapped = Handle()
            return outer.wrapped

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(lazy, "safe_open", CountingOpen)
    parameters = LazyParameters([folder / "model.safetensors"])
    assert sorted(parameters) == ["a", "b", "ids"] and len(parameters) == 3
    assert parameters.shape("a") == (2, 3) and "a" in parameters and "zz" not in parameters
    assert read == []
    assert torch.equal(parameters["b"], tensors["b"]) and parameters["b"].dtype == torch.float16
    assert read == ["b", "b"]  # only the tensor asked for, once per lookup (nothing cached)
    with pytest.raises(KeyError):
        parameters["zz"]


def test_a_tensor_is_read_from_disk_at_each_access_not_cached(checkpoint):
    folder, tensors = checkpoint
    parameters = LazyParameters([folder / "model.safetensors"])
    assert torch.equal(parameters["a"], tensors["a"])
    save_file({**tensors, "a": -tensors["a"]}, folder / "model.safetensors")  # same header, new values
    assert torch.equal(parameters["a"], -tensors["a"])


def test_dtype_converts_floating_tensors_only_and_names_restrict_the_keys(checkpoint):
    folder, tensors = checkpoint
    parameters = LazyParameters([folder / "model.safetensors"], names=["b", "ids"], dtype=torch.float32)
    assert list(parameters) == ["b", "ids"]
    assert parameters["b"].dtype == torch.float32 and parameters["ids"].dtype == torch.int64
    with pytest.raises(KeyError, match="not in the checkpoint"):
        LazyParameters([folder / "model.safetensors"], names=["a", "missing"])


def test_sharded_checkpoints_and_folders_without_safetensors(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    parameters = lazy_parameters(tmp_path)
    assert dict(parameters.items()).keys() == {"x", "y"}
    assert torch.equal(parameters["y"], torch.zeros(3))
    assert safetensors_files(tmp_path / "nothing") is None
    assert lazy_parameters(tmp_path, names=["x", "tied_and_not_saved"]) is None


def test_a_saved_model_reads_back_equal_to_its_parameters(tmp_path):
    model = make_model("bert_cls", 3)
    model.save_pretrained(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    parameters = lazy_parameters(tmp_path, names=names)
    assert list(parameters) == names
    for name, tensor in model.named_parameters():
        assert torch.equal(parameters[name], tensor.detach()), name


def test_reading_every_tensor_keeps_memory_flat(tmp_path):
    """Peak RSS after reading all tensors of a 128 MB checkpoint one by one stays far below the file size (a
    long-lived memory map would keep every page read resident)."""
    save_file({f"t{i}": torch.randn(512, 1024) for i in range(64)}, tmp_path / "model.safetensors")
    script = textwrap.dedent(f"""
        import resource, torch
        from hf_mudsc.load.lazy import lazy_parameters
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = 0.0
        for name, tensor in lazy_parameters({str(tmp_path)!r}).items():
            total += float(tensor[0, 0])
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ROOT})
    grown = float(run.stdout.strip().splitlines()[-1])
    assert grown < 40, f"peak RSS grew by {grown:.0f} MB reading a 128 MB checkpoint"


def _hub_style(model, folder, *, keys: str) -> None:
    """A checkpoint folder as found on the Hub: config.json and model.safetensors, its keys the ones
    `save_pretrained` writes (transformers 5 writes ViT's legacy names: `encoder.layer.0.intermediate.dense`; in
    one file or `sharded`), or (float16, written with safetensors) the model's own parameter names
    (`layers.0.mlp.fc1`), or those with the TensorFlow-era `LayerNorm.gamma`/`beta` of old BERT checkpoints."""
    if keys in ("save_pretrained", "sharded"):
        model.save_pretrained(folder, **({"max_shard_size": "20KB"} if keys == "sharded" else {}))
        assert (keys == "sharded") == (folder / "model.safetensors.index.json").is_file()
        return
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    tensors = {n: t.detach().half().contiguous() for n, t in model.state_dict().items()}
    if keys == "gamma/beta":
        tensors = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
                   for n, t in tensors.items()}
        assert any(n.endswith("LayerNorm.gamma") for n in tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(("kind", "keys"), [
    ("vit_cls", "save_pretrained"), ("vit_cls", "sharded"), ("vit_cls", "parameter names"), ("vit", "save_pretrained"),
    ("bert_cls", "save_pretrained"), ("bert_cls", "gamma/beta"), ("roberta_cls", "save_pretrained"),
    ("distilbert_cls", "save_pretrained"), ("distilbert", "save_pretrained"),
    ("clip", "save_pretrained"), ("clip_vision", "save_pretrained"), ("clip_text", "save_pretrained")])
def test_the_lazy_view_maps_checkpoint_keys_to_parameters_as_from_pretrained_does(tmp_path, kind, keys):
    """transformers 5 renames checkpoint keys as it loads them (a ViT's `vit.encoder.layer.0.intermediate.dense.
    weight` is the model's `vit.layers.0.mlp.fc1.weight`): the lazy view names its tensors by the same conversion
    mapping, so it exists for such checkpoints and holds exactly what `from_pretrained` loads."""
    from hf_mudsc.load.parents import load_parents_and_base

    model = make_model(kind, 1)
    _hub_style(model, tmp_path / "a", keys=keys)
    _hub_style(make_model(kind, 2), tmp_path / "b", keys=keys)
    stored = LazyParameters(safetensors_files(tmp_path / "b"))
    names = [name for name, _ in model.named_parameters()]
    if kind.startswith("vit") and keys != "parameter names" or keys == "gamma/beta":  # the renamed checkpoints
        assert not set(names) <= set(stored), "the checkpoint holds the parameters' own names"
    parents, _, _ = load_parents_and_base([str(tmp_path / "a"), str(tmp_path / "b")], lazy=True)
    view = parents[1].parameters
    assert view is not None, "parent B was loaded whole, not read one tensor at a time"
    loaded = type(model).from_pretrained(tmp_path / "b", dtype=torch.float32)
    want = dict(loaded.named_parameters())
    assert sorted(view) == sorted(want) == sorted(names)
    for name, tensor in want.items():
        got = view[name]
        assert got.dtype == torch.float32 and torch.equal(got, tensor.detach()), name
        assert view.shape(name) == tuple(tensor.shape), name


def test_a_checkpoint_transformers_converts_beyond_renaming_is_left_to_whole_loading(tmp_path, caplog):
    """A conversion that splits tensors (DINOv2's SwiGLU `mlp.weights_in` -> `gate_proj` + `up_proj`, a `Chunk`) is
    not a rename: no lazy view (the parent is loaded whole, which converts it), and a debug line says why."""
    import logging

    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
                          use_swiglu_ffn=True)
    Dinov2Model(config).save_pretrained(tmp_path)
    assert any(".mlp.weights_in." in key for key in LazyParameters(safetensors_files(tmp_path)))
    with torch.device("meta"):
        model = Dinov2Model(config)
    with caplog.at_level(logging.DEBUG, logger=lazy.__name__):
        assert lazy_parameters(tmp_path, names=[n for n, _ in model.named_parameters()], model=model) is None
    assert "mlp.weights_in" in caplog.text and "not only renamed" in caplog.text, caplog.text
    # The tensors it only renames are named as the model names them.
    keys = lazy.stored_keys(model, ["encoder.layer.0.attention.attention.query.weight"])
    assert keys == {"encoder.layer.0.attention.q_proj.weight": "encoder.layer.0.attention.attention.query.weight"}


def test_a_transformers_without_the_renaming_internals_loads_renamed_checkpoints_whole(tmp_path, monkeypatch):
    """The renaming is read from transformers' loading internals (`core_model_loading`): a release that moves them
    must cost streaming, never the merge — no lazy view, and the parent loaded whole converts its keys itself."""
    from hf_mudsc.load.parents import load_parents_and_base

    for name, seed in (("a", 1), ("b", 2)):
        _hub_style(make_model("vit_cls", seed), tmp_path / name, keys="save_pretrained")
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # `import` raises ImportError
    with torch.device("meta"):
        model = make_model("vit_cls", 1)
    assert lazy.stored_keys(model, ["vit.encoder.layer.0.attention.attention.query.weight"]) is None
    parents, _, _ = load_parents_and_base([str(tmp_path / "a"), str(tmp_path / "b")], lazy=True)
    assert parents[1].parameters is None  # loaded whole
    want = type(model).from_pretrained(tmp_path / "b", dtype=torch.float32).state_dict()
    got = parents[1].model.state_dict()
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


def test_auto_opens_each_parent_for_reading_one_tensor_at_a_time_once(tmp_path, monkeypatch):
    """`auto` opens every parent lazily to choose before loading; when its choice streams, the parents after the first
    were opened a second time to be merged (their headers read and a meta model built again): the views it chose on
    are the ones it merges."""
    import hf_mudsc

    folders = []
    for seed in range(3):
        fine_tune(make_model("bert_cls", 0), seed, 0.01, relative=True).save_pretrained(tmp_path / f"p{seed}")
        folders.append(str(tmp_path / f"p{seed}"))
    opened = []
    real = lazy.lazy_parameters
    monkeypatch.setattr(lazy, "lazy_parameters", lambda folder, **k: opened.append(str(folder)) or real(folder, **k))
    merged = hf_mudsc.merge(folders, None, progress=False)
    assert merged.config.mudsc["method"] == "linear"  # fine-tunes of one base, no data: streamed
    assert sorted(opened) == sorted(folders), opened


def test_non_finite_tensors_reads_in_chunks_and_names_only_nan_or_inf(tmp_path):
    """The check `hf-mudsc push DIR` runs: a float64 past float32's range is finite (no down-cast), a 0-d NaN and
    a NaN in the last chunk of a tensor are found, integer tensors are not floating weights."""
    late = torch.zeros(50, 7)
    late[-1, -1] = float("nan")
    tensors = {"big64": torch.full((3, 3), 1e300, dtype=torch.float64), "late": late,
               "scalar": torch.tensor(float("inf")), "ints": torch.arange(4),
               "half": torch.ones(5, dtype=torch.float16), "fine": torch.randn(8, 8)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    assert lazy.non_finite_tensors(path, chunk_elements=10) == ["late", "scalar"]
    assert lazy.non_finite_tensors(path) == ["late", "scalar"]
