"""The README's shell commands hold as written: each `m3-jax` and `train/main.py` command parses
with the real parsers (config keys included), and each script, config and repository path it
names exists. `tools/check_readme.py` runs the commands themselves in a fresh clone."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from m3_jax.cli.main import build_parser
from m3_jax.cli.train import config_file, load_config, unknown_override

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY_DIRS = ("configs/", "train/", "tools/", "notebooks/", "tests/")


def check_readme_module():
    spec = importlib.util.spec_from_file_location("check_readme", ROOT / "tools/check_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


COMMANDS = check_readme_module().readme_commands((ROOT / "README.md").read_text())


def simple_commands(text: str) -> list[list[str]]:
    """The argv of each command of a `&&` / `;` chain."""
    words = shlex.split(text, comments=True)
    out, current = [], []
    for word in words:
        if word in ("&&", ";", "||"):
            out.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*out, current] if c]


def check_train(argv: list[str]) -> None:
    spec = config_file(argv)
    assert spec, f"no --config in {argv}"
    file, colon, arg = spec.partition(":")
    assert (ROOT / file).is_file(), file
    assert unknown_override(load_config(f"{ROOT / file}{colon}{arg}"), argv) is None


def test_the_readme_has_the_commands_a_new_user_runs():
    runnable = [c.text for c in COMMANDS if c.skip is None]
    assert any(
        "train/main.py --config configs/demo_cpu.py" in c and "pip install ." in c for c in runnable
    )
    assert any('pip install -e ".[test]"' in c and "pytest" in c for c in runnable)
    assert any("m3-jax evaluate" in c for c in runnable)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"README:{c.line}")
def test_readme_command_parses_and_names_existing_files(command):
    for argv in simple_commands(command.text):
        if argv[0] == "m3-jax" and argv[1] == "train":
            check_train(argv[2:])
        elif argv[0] == "m3-jax":
            build_parser().parse_args(argv[1:])  # exits 2 on an unknown option
        elif argv[0] == "python" and argv[1] == "train/main.py":
            check_train(argv[2:])
        elif argv[0] == "python" and argv[1].startswith("tools/"):
            assert (ROOT / argv[1]).is_file(), argv[1]
        if command.skip is None:
            for word in argv:
                value = word.split("=", 1)[-1]
                if value.startswith(REPOSITORY_DIRS) and "*" not in value:
                    assert (ROOT / value.partition(":")[0]).exists(), value
