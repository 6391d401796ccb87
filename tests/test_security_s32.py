"""Defects found by the s32 security hunt: each test failed before its fix."""

from __future__ import annotations

import pytest

from hf_mudsc.cli.main import command_in, main

# ---------------------------------------------------------------- a --token value before the command

SECRET = "s3cr3t-Enterprise-Token-9f8e7d"  # not hf_-shaped: a self-hosted Hub's or an org's token


@pytest.mark.parametrize("argv", [
    ["--token", SECRET, "merge", "a/x", "b/y"],  # the flag before the command (a common slip)
    [f"--token={SECRET}", "merge", "a/x", "b/y"],
    ["-v", "--token", SECRET, "push", "out", "me/x"],
    ["--api-key", SECRET, "serve"],  # the service's API key, same slip
    ["--tok", SECRET, "merge", "a/x", "b/y"],  # an abbreviation argparse accepts
    ["merge", "a/x", "b/y", "--token", SECRET, "--nosuchflag"],
    ["merge", "a/x", "b/y", "--tokn", SECRET],
    ["merge", "a/x", "b/y", "--to", SECRET, "--batch-size", SECRET],  # the value elsewhere in the same argv
])
def test_argument_errors_never_echo_a_token_value_wherever_it_stands(capsys, argv):
    """`hf-mudsc --token SECRET merge a b` said "invalid choice: 'SECRET'" (README: an argument error shows a
    `--token` value as `***`)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and SECRET not in err, err
    assert "***" in err or "unrecognized arguments: --nosuchflag\n" in err, err


@pytest.mark.parametrize("argv", [["--token", SECRET, "merge"], [f"--token={SECRET}", "merge"],
                                  ["--api-key", "merge", "serve"], ["-v", "--tok", "push", "merge"]])
def test_the_command_is_never_taken_from_a_token_value(argv):
    assert command_in(argv) == argv[-1]


# ---------------------------------------------------------------- an unsupported architecture refused from config.json


def detr_folder(folder, backbone: str = "resnet50", timm: bool = True):
    """A DETR fine-tune's folder, its config as facebook/detr-resnet-50 ships it (a timm backbone, pretrained): an
    architecture no adapter merges, whose constructor imports timm and downloads the backbone's weights."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "detr", "architectures": ["DetrForObjectDetection"], "use_timm_backbone": timm,
        "backbone": backbone, "use_pretrained_backbone": True, "num_labels": 2, "d_model": 8, "encoder_layers": 1,
        "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 8,
        "decoder_ffn_dim": 8, "num_queries": 2}))
    save_file({"x": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def built_nothing(monkeypatch):
    """Fail the test when a model class is built or a config is read by transformers: the refusal comes first."""
    import transformers

    from hf_mudsc.load import parents

    def refuse(*args, **kwargs):
        raise AssertionError("a model or config was built before the architecture was refused")

    monkeypatch.setattr(parents, "meta_model", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_unsupported_architecture_is_refused_before_its_model_is_built(tmp_path, monkeypatch, dry_run):
    """Two DETR folders gave a 61-line traceback ending in `pip install timm` (the model was built on the meta device
    to compare it with its weights before the support check), instead of the one line naming the supported types."""
    import hf_mudsc
    from hf_mudsc.errors import UnsupportedArchitectureError

    a, b = detr_folder(tmp_path / "a"), detr_folder(tmp_path / "b")
    built_nothing(monkeypatch)
    with pytest.raises(UnsupportedArchitectureError) as refused:
        hf_mudsc.merge([str(a), str(b)], method="linear", dry_run=dry_run, progress=False)
    line = str(refused.value)
    assert line.startswith("hf_mudsc cannot merge DetrForObjectDetection (model_type='detr'); supported model types: ")
    assert "vit" in line and "\n" not in line


def test_the_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path, capsys):
    a, b = detr_folder(tmp_path / "a"), detr_folder(tmp_path / "b")
    assert main(["merge", str(a), str(b), "--method", "linear", "--output", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot merge DetrForObjectDetection" in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_makes_no_hub_request_for_the_repository_its_config_names(local_hub, tmp_path):
    """A config naming `backbone: other/backbone` made Hub requests for that repository (AutoConfig fetched its config)
    before the refusal, local parents or Hub ones alike."""
    import hf_mudsc
    from hf_mudsc.errors import UnsupportedArchitectureError

    for name in "ab":
        detr_folder(tmp_path / name, backbone="other/backbone", timm=False)
        local_hub.create_repo(f"org/detr-{name}")
        local_hub.upload_folder(f"org/detr-{name}", tmp_path / name)
    for parents in ([str(tmp_path / "a"), str(tmp_path / "b")], ["org/detr-a", "org/detr-b"]):
        with pytest.raises(UnsupportedArchitectureError, match="cannot merge DetrForObjectDetection"):
            hf_mudsc.merge(parents, method="linear", progress=False)
    assert not [request.path for request in local_hub.requests if "other/backbone" in request.path]


def test_evaluate_still_loads_a_model_no_adapter_merges(tmp_path):
    """The refusal is the merge's: evaluate scores models of any architecture (its harness reads no adapter)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_mudsc.load.parents import load_parent

    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
                                              num_labels=2)).save_pretrained(tmp_path / "resnet")
    assert type(load_parent(str(tmp_path / "resnet")).model).__name__ == "ResNetForImageClassification"


# ---------------------------------------------------------------- a token read from a file, its line break with it

PASTED = "org-secret-token-0123456789"  # not hf_-shaped: hide_tokens alone would not hide it


@pytest.fixture()
def hub_parents(local_hub, tmp_path):
    from factories import make_model

    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
        local_hub.create_repo(f"user/{name}")
        local_hub.upload_folder(f"user/{name}", tmp_path / name)
    return local_hub


def sent_tokens(hub) -> set[str]:
    return {request.headers["authorization"] for request in hub.requests if "authorization" in request.headers}


@pytest.mark.parametrize("end", ["\n", "\r\n", " "])
def test_a_token_read_from_a_file_is_used_without_its_line_break(hub_parents, end):
    """`token=open("token.txt").read()` failed as "the connection to the Hub dropped ... (Illegal header value
    b'Bearer <the token>\\n'); retry the command": the token in the message, advice that cannot help."""
    import hf_mudsc

    hf_mudsc.merge(["user/a", "user/b"], method="linear", progress=False, token=PASTED + end)
    assert sent_tokens(hub_parents) == {f"Bearer {PASTED}"}


@pytest.mark.parametrize("token", [f"{PASTED[:8]}\n{PASTED[8:]}", f"{PASTED[:8]} {PASTED[8:]}", "\n", f"{PASTED}\x00"])
def test_a_token_with_a_break_inside_is_refused_in_one_line_that_never_shows_it(hub_parents, token):
    import hf_mudsc

    with pytest.raises(ValueError) as refused:
        hf_mudsc.merge(["user/a", "user/b"], method="linear", progress=False, token=token)
    line = str(refused.value)
    assert "\n" not in line and "token=" in line and "--token" in line, line
    assert PASTED[:8] not in line and PASTED[8:] not in line
    assert not hub_parents.requests  # refused before any Hub call


def test_the_cli_takes_a_token_from_a_crlf_file_and_refuses_one_broken_inside(hub_parents, hub_cli, tmp_path):
    done = hub_cli("merge", "user/a", "user/b", "--method", "linear", "--output", str(tmp_path / "out"),
                   "--token", PASTED + "\r", token=None)
    assert done.returncode == 0, done.stderr
    assert sent_tokens(hub_parents) == {f"Bearer {PASTED}"}
    for command in (["merge", "user/a", "user/b", "--output", str(tmp_path / "o2")], ["push", str(tmp_path / "out"),
                    "user/m"], ["evaluate", "user/a", "--dataset", "d:test"]):
        done = hub_cli(*command, "--token", PASTED[:8] + "\r\n" + PASTED[8:], token=None)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "--token" in lines[0], done.stderr
        assert PASTED[:8] not in done.stderr and PASTED[8:] not in done.stderr, done.stderr


def test_push_merged_takes_a_token_with_its_line_break(hub_parents, tmp_path):
    import hf_mudsc

    merged = hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], method="linear", progress=False)
    hf_mudsc.push_merged(merged, "user/merged", token=hub_parents.token + "\n")
    assert hub_parents.file_bytes("user/merged", "config.json")
    assert sent_tokens(hub_parents) == {f"Bearer {hub_parents.token}"}


def test_the_service_refuses_a_bearer_token_with_a_break_inside(tmp_path):
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1")
    answer = client.post("/api/jobs", json={"models": ["user/a", "user/b"], "method": "average", "dry_run": True},
                         headers={"Authorization": f"Bearer {PASTED[:8]}\t{PASTED[8:]}"})
    assert answer.status_code == 400 and PASTED[:8] not in answer.text and PASTED[8:] not in answer.text, answer.text
    assert "Authorization" in answer.json()["error"], answer.text


def test_a_bearer_header_in_an_error_never_shows_its_token():
    from hf_mudsc.load.references import hide_tokens

    assert hide_tokens(f"Illegal header value b'Bearer {PASTED}\\n'") == "Illegal header value b'Bearer ***"


def test_a_dropped_connection_while_pinning_the_calibration_data_is_one_line(monkeypatch):
    """An httpx error while resolving a Hub dataset's revision was an 83-line traceback."""
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    from hf_mudsc.calibrate.datasets import pin_calibration_revision
    from hf_mudsc.errors import CalibrationError
    from hf_mudsc.load.hub_calls import http_client

    def drop(*args, **kwargs):
        raise http_client().ConnectError("[Errno 104] Connection reset by peer")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", drop)
    with pytest.raises(CalibrationError) as refused:
        pin_calibration_revision("user/ds:train")
    line = str(refused.value)
    assert "\n" not in line and "'user/ds:train'" in line and "Connection reset by peer" in line, line


# ---------------------------------------------------------------- evaluate: pickle-only parents


@pytest.fixture(scope="module")
def pickle_parents(tmp_path_factory):
    """A merge of two tiny ViTs, the same parents saved as pickle only (pytorch_model.bin), and a test split."""
    import datasets
    import torch
    from factories import make_model

    import hf_mudsc

    work = tmp_path_factory.mktemp("pickle")
    for name, seed in (("a", 1), ("b", 2)):
        model = make_model("vit_cls", seed)
        model.save_pretrained(work / name)
        (work / f"{name}_pickle").mkdir()
        model.config.save_pretrained(work / f"{name}_pickle")
        torch.save(model.state_dict(), work / f"{name}_pickle" / "pytorch_model.bin")
    hf_mudsc.save_merged(hf_mudsc.merge([str(work / "a"), str(work / "b")], method="linear", progress=False),
                         work / "merged")
    generator = torch.Generator().manual_seed(0)
    datasets.Dataset.from_dict({"pixel_values": torch.randn(8, 1, 16, 16, generator=generator).tolist(),
                                "label": [0, 1, 2, 0, 1, 2, 0, 1]}).save_to_disk(str(work / "data"))
    return work


def test_evaluate_takes_the_allow_pickle_its_refusal_advises(pickle_parents, capsys):
    """`hf-mudsc evaluate` with pickle-only parents advised `--allow-pickle`, a flag evaluate refused."""
    work = pickle_parents
    command = ["evaluate", str(work / "merged"), "--parents", str(work / "a_pickle"), str(work / "b_pickle"),
               "--dataset", f"{work / 'data'}:train", "--no-card"]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "--allow-pickle" in err, err
    assert main([*command, "--allow-pickle"]) == 0, capsys.readouterr().err
    assert "| parent B |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--allow-pickle" in capsys.readouterr().out


def test_evaluate_merge_takes_allow_pickle(pickle_parents):
    import datasets

    import hf_mudsc

    work = pickle_parents
    data = datasets.load_from_disk(str(work / "data"))
    parents = [str(work / "a_pickle"), str(work / "b_pickle")]
    with pytest.raises(ValueError, match="allow_pickle=True"):
        hf_mudsc.evaluate_merge(str(work / "merged"), parents, [data], progress=False)
    result = hf_mudsc.evaluate_merge(str(work / "merged"), parents, [data], progress=False, allow_pickle=True)
    assert result.parent_scorers == ["parent_a", "parent_b"]


# ---------------------------------------------------------------- attention code named in the dict form


@pytest.mark.parametrize(("edit", "named"), [
    (lambda c: c.update(attn_implementation={"": "kernels-community/flash-attn"}), "attn_implementation['']"),
    (lambda c: c.update(attn_implementation={"": "sdpa", "vision_config": "kernels-community/x"}),
     "attn_implementation['vision_config']"),
    (lambda c: c.update(_attn_implementation={"": {"deeper": "kernels-community/x"}}), "_attn_implementation['']"),
    (lambda c: c.update(vision_config={"attn_implementation": {"": "kernels-community/x"}}),
     "vision_config.attn_implementation['']"),  # a sub-config's (CLIP's towers)
    (lambda c: c.update(attn_implementation=["kernels-community/x"]), "attn_implementation"),
])
def test_a_hub_kernel_named_in_the_dict_form_of_attn_implementation_is_refused(tmp_path, capsys, edit, named):
    """`"attn_implementation": {"": "kernels-community/x"}` (transformers' per-sub-config form) passed the check and
    reached transformers' Hub-kernel loader (with `kernels` installed it downloads and imports that repository)."""
    from factories import vit_folder

    a, b = (vit_folder(tmp_path / name, edit=edit) for name in "ab")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["merge", str(a), str(b), "--method", "linear", "--output", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"config.json sets {named} to " in err[0] and "remove the key" in err[0], err


def test_transformers_own_attention_in_the_dict_form_is_accepted(tmp_path):
    from factories import vit_folder

    from hf_mudsc.load.config_json import check_config_json

    folder = vit_folder(tmp_path / "a", edit=lambda c: c.update(attn_implementation={"": "sdpa", "x": "eager",
                                                                                     "y": None}))
    assert check_config_json(folder, "a")["attn_implementation"] == {"": "sdpa", "x": "eager", "y": None}
