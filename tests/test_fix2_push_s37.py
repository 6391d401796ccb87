"""Session 37, final review's push findings: the retry command printed after a failed push keeps `--private` and
`--overwrite` (and quotes the kept folder for a shell); the pushed card's usage snippet is rewritten only within the
"## Usage" section, only for the loads the writer put there, never in a README changed since it was written, and in a
CRLF card too."""

from __future__ import annotations

import re
import shlex

import pytest
from test_cli import save_parents_and_data

import hf_mudsc
from hf_mudsc.publish.hub import pushed_card
from hf_mudsc.publish.writer import CommitOptions, push_flags

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("fix2push37_inputs"))


@pytest.fixture(scope="module")
def merged(inputs):
    """The module's merge of the two tiny ViTs, in memory (zipit, 24 samples)."""
    a, b, calibration = inputs
    return hf_mudsc.merge([str(a), str(b)], str(calibration), method="zipit", num_samples=24, batch_size=8,
                          progress=False)


@pytest.fixture(scope="module")
def folder(merged, tmp_path_factory):
    """The same merge saved as `hf-mudsc merge --output` writes it (its card loads `path/to/this/model`)."""
    return hf_mudsc.save_merged(merged, tmp_path_factory.mktemp("fix2push37_folder") / "merged")


def retry_command(error: BaseException) -> list[str]:
    return shlex.split(re.search(r"`(hf-mudsc push [^`]+)`", str(error)).group(1))


def test_the_retry_command_after_a_failed_private_push_creates_a_private_repo(hub_cli, local_hub, merged, tmp_path,
                                                                                monkeypatch):
    """push_merged(m, "user/secret", private=True), the commit failing: the printed `hf-mudsc push KEPT user/secret`
    lacked --private, so running it created a PUBLIC repo; it now has --private and the repo it creates is private."""
    import shutil
    import tempfile

    from hf_mudsc.errors import PushError

    hub = local_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    hub.fail_next("commit", status=500)
    with pytest.raises(PushError) as caught:
        hf_mudsc.push_merged(merged, "user/secret", private=True)
    assert not hub.repo_exists("user/secret")  # the run deleted the repo it created
    words = retry_command(caught.value)
    assert "--private" in words
    run = hub_cli(*words[1:])
    assert run.returncode == 0, run.stderr
    assert hub.is_private("user/secret")
    shutil.rmtree(words[2])


def test_the_retry_command_keeps_overwrite_and_quotes_the_folder(hub_cli, local_hub, merged, tmp_path, monkeypatch):
    """push_merged(m, "user/m", overwrite=True) over an existing repo, to a kept folder whose path has a space, the
    commit failing: the printed command lacked --overwrite (refused: the repo exists) and split the path in two; it
    now runs as printed and replaces the repo's model."""
    import shutil
    import tempfile

    from hf_mudsc.errors import PushError

    hub = local_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    scratch = tmp_path / "with space"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from huggingface_hub import HfApi

    HfApi().create_repo("user/m")
    HfApi().upload_file(path_or_fileobj=b"old", path_in_repo="old.txt", repo_id="user/m")
    before = hub.head("user/m")
    hub.fail_next("commit", status=500)
    with pytest.raises(PushError) as caught:
        hf_mudsc.push_merged(merged, "user/m", overwrite=True, commit_message="Second")
    words = retry_command(caught.value)
    assert "--overwrite" in words and words[2].startswith(str(scratch))
    run = hub_cli(*words[1:])
    assert run.returncode == 0, run.stderr
    assert hub.head("user/m") != before and hub.commits("user/m")[0].title == "Second"
    assert "old.txt" not in hub.list_files("user/m") and "model.safetensors" in hub.list_files("user/m")
    shutil.rmtree(words[2])


def test_push_flags_say_private_and_overwrite_only_when_given():
    """push_flags(None) / push_flags(None, private=True, overwrite=True): the flags the retry needs, none other."""
    assert push_flags(None) == ""
    assert push_flags(None, private=True, overwrite=True) == " --private --overwrite"
    assert push_flags(CommitOptions("a b", None, "dev", False), private=True) == (
        " --private --revision dev --commit-message 'a b'")


CARD = """---
license: apache-2.0
---

# merged

## Usage

```python
from transformers import AutoModel, AutoImageProcessor


model = AutoModel.from_pretrained("path/to/this/model")
processor = AutoImageProcessor.from_pretrained("path/to/this/model")
tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
```

## Parents

```python
parent = AutoModel.from_pretrained("org/parent-a")
```
"""


def test_pushed_card_rewrites_only_the_writers_loads():
    """pushed_card(card whose Usage also loads "bert-base-uncased", "user/m"): that load was rewritten to user/m; now
    only the loads of `path/to/this/model` are."""
    pushed = pushed_card(CARD, "user/m")
    assert pushed.count('from_pretrained("user/m")') == 2
    assert 'AutoTokenizer.from_pretrained("bert-base-uncased")' in pushed
    assert 'parent = AutoModel.from_pretrained("org/parent-a")' in pushed


def test_pushed_card_leaves_the_next_sections_code_alone():
    """pushed_card(card whose Usage has no code block, a later section loading "org/parent-a", "user/m"): the later
    block was rewritten to user/m; now the card is unchanged."""
    text = CARD.replace(CARD[CARD.index("```python"):CARD.index("## Parents")], "Load it with transformers.\n\n")
    assert pushed_card(text, "user/m") == text
    # a later section loading the placeholder itself is not the usage snippet either
    other = text.replace("org/parent-a", "path/to/this/model")
    assert pushed_card(other, "user/m") == other


def test_pushed_card_rewrites_the_repo_the_card_was_written_for():
    """pushed_card(card written for "user/old" on branch dev, "user/new"): its loads of user/old (with the revision)
    name user/new on main; a load of another repo, or another section's, stays."""
    text = CARD.replace('"path/to/this/model"', '"user/old", revision="dev"')
    pushed = pushed_card(text, "user/new")
    assert pushed.count('from_pretrained("user/new")') == 2 and '"user/old"' not in pushed
    assert 'AutoTokenizer.from_pretrained("bert-base-uncased")' in pushed
    assert 'parent = AutoModel.from_pretrained("org/parent-a")' in pushed


def test_pushed_card_accepts_crlf():
    """pushed_card(the card with CRLF line ends, "user/m"): it was left unchanged (naming path/to/this/model); now its
    loads name user/m and its line ends stay CRLF."""
    text = CARD.replace("\n", "\r\n")
    pushed = pushed_card(text, "user/m")
    assert pushed.count('from_pretrained("user/m")') == 2
    assert pushed == pushed_card(CARD, "user/m").replace("\n", "\r\n")


def test_a_changed_readme_is_pushed_as_the_user_left_it(hub_cli, local_hub, folder, tmp_path):
    """hf-mudsc push DIR user/m --allow-changed, README.md edited (loads "path/to/this/model" and "bert-base-uncased"):
    the edited snippet was rewritten; now README.md goes up byte for byte as left, and a log line says so."""
    import shutil

    hub = local_hub
    copy = tmp_path / "merged"
    shutil.copytree(folder, copy)
    card = copy / "README.md"
    edited = card.read_text() + '\n```python\nAutoTokenizer.from_pretrained("bert-base-uncased")\n```\n'
    card.write_text(edited)
    run = hub_cli("push", str(copy), "user/m", "--allow-changed")
    assert run.returncode == 0, run.stderr
    assert hub.file_bytes("user/m", "README.md").decode() == edited
    assert "README.md" in run.stderr and "as you left it" in run.stderr, run.stderr


def test_an_unchanged_readme_still_names_the_push_target(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m (README as written, loading path/to/this/model): the pushed card loads user/m."""
    run = hub_cli("push", str(folder), "user/m")
    assert run.returncode == 0, run.stderr
    card = local_hub.file_bytes("user/m", "README.md").decode()
    assert 'from_pretrained("user/m")' in card and "path/to/this/model" not in card
