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
