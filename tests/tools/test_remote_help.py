"""``ftune --help``, ``ftune remote --help`` and every subcommand's help read as plain text: no
docstring markup (double backquotes) shows up in a terminal."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator

from ftune.admin import add_admin_commands
from ftune.cli import add_remote_command, add_service_commands
from ftune.client.cli import build_parser
from ftune.models.cli import build_parser as build_ftune_parser
from ftune.processes import ftune_command


def _parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_no_help_text_shows_double_backquotes():
    helps = dict(_parsers(build_parser(), "ftune remote"))
    assert len(helps) > 15  # every group and subcommand was walked
    whole = build_ftune_parser(add_service_commands, add_admin_commands, add_remote_command)
    helps.update(_parsers(whole, "ftune"))
    assert {"ftune", "ftune train", "ftune up", "ftune keys"} <= helps.keys()
    marked = {path: [line for line in text.splitlines() if "``" in line]
              for path, text in helps.items() if "``" in text}
    assert not marked, marked


def test_the_command_prints_plain_help():
    done = subprocess.run([*ftune_command("remote"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the API from the command line" in done.stdout and "``" not in done.stdout
