"""The command line: every subcommand is registered, and running one loads only its own module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oneoff_audit.cli import COMMANDS, build_parser, main

pytestmark = pytest.mark.unit


def test_every_command_is_registered_by_the_module_named_for_it():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # argparse keeps subcommands here
    assert sorted(choices) == sorted(COMMANDS)
    for command in COMMANDS:
        only = build_parser(command)._subparsers._group_actions[0].choices
        assert command in only


def test_running_record_does_not_import_the_api_crypto_or_local_stack():
    code = ("import sys\nfrom oneoff_audit.cli import build_parser, _command_of\n"
            "build_parser(_command_of(['record', '--app', 'a', '--actor-id', 'u', '--', 'true']))\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('oneoff_audit'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "oneoff_audit.capture.cli" in loaded
    assert not {"oneoff_audit.api", "oneoff_audit.auditor", "oneoff_audit.local", "oneoff_audit.crypto",
                "oneoff_audit.evidence"} & set(loaded)


def test_errors_are_one_line_and_exit_2(capsys):
    assert main(["verify", "/nonexistent/log.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oneoff-audit verify: ") and err.count("\n") == 1
