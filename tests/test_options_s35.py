"""Session 35, options: every place that reads a merge option (the CLI, a recipe, `hf_mudsc.merge`, the dry run)
refuses what the merge would refuse, in one line naming the option, before anything is loaded."""

from __future__ import annotations

import pytest
from cli_runs import run_cli


@pytest.mark.parametrize("argv, named", [
    (["--alpha", "0.3", "--alpha", "0.7"], "--alpha"),
    (["--calibration", "X:train", "--calibration", "Y:train"], "--calibration"),
    (["--slerp-t", "0", "0.5", "1", "--slerp-t", "1"], "--slerp-t"),
    (["--weights", "1", "2", "--weights", "3", "4"], "--weights"),
    (["--rescale", "--no-rescale"], "--rescale"),
    (["-o", "out-a", "--output", "out-b"], "--output"),
    (["--alph", "0.3", "--alpha=0.7"], "--alpha"),
    (["--token", "hf_AAAAAAAAAAAAAAAAAAAAAAAAAA", "--token", "hf_BBBBBBBBBBBBBBBBBBBBBBBBBB"], "--token"),
])
def test_a_flag_given_twice_is_refused(argv, named, capsys, tmp_path, monkeypatch):
    """hf-mudsc merge A B --alpha 0.3 --alpha 0.7 --dry-run: argparse kept 0.7 silently."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["merge", "a", "b", *argv, "--dry-run"], capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert f"{named} " in lines[0] and "once" in lines[0], lines
    assert "hf_A" not in lines[0] and "hf_B" not in lines[0]


def test_flags_meant_to_repeat_still_repeat(capsys, tmp_path, monkeypatch):
    """hf-mudsc evaluate DIR -d a:test -d b:test --metric accuracy --metric f1: append flags keep every value."""
    from hf_mudsc.cli.main import build_parser

    args = build_parser(available=["evaluate"]).parse_args(
        ["-v", "-v", "evaluate", "dir", "-d", "a:test", "-d", "b:test", "--metric", "accuracy", "--metric", "f1"])
    assert args.dataset == ["a:test", "b:test"] and args.metric == ["accuracy", "f1"] and args.verbose == 2
