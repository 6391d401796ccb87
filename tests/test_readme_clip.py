"""The README's CLIP example runs as printed (offline), in Python and on the command line."""

from __future__ import annotations

import shlex

import torch
from readme_examples import readme_blocks, readme_example
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from hf_mudsc.cli.main import main


def test_the_readme_clip_example_runs(tmp_path, monkeypatch):
    python = readme_example("clip")
    [command] = [line for block in readme_blocks("bash") for line in block.splitlines()
                 if line.startswith("hf-mudsc merge clip-0 clip-1")]
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "README.md (CLIP example)", "exec"), {"__name__": "readme_clip"})

    merged = CLIPModel.from_pretrained(tmp_path / "clip-merged")
    assert merged.config.mudsc["method"] == "mudsc"
    assert merged.config.mudsc["num_calibration_samples"] == 32  # one image-caption pair per row
    processor = CLIPProcessor.from_pretrained(tmp_path / "clip-merged")
    inputs = processor(text=["a photo of a cat"], images=[torch.zeros(3, 24, 24)], return_tensors="pt")
    with torch.no_grad():
        assert merged(**inputs).logits_per_image.shape == (1, 1)

    assert main(shlex.split(command)[1:]) == 0
    cli = load_file(tmp_path / "clip-merged-cli" / "model.safetensors")
    api = load_file(tmp_path / "clip-merged" / "model.safetensors")
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in api)
    assert (tmp_path / "clip-merged-cli" / "tokenizer_config.json").is_file()
