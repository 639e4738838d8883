"""Run the README's shell commands as written, in a fresh clone, and time each one.

    python tools/check_readme.py --clone /tmp/readme_clone     # clone this checkout there, run all
    python tools/check_readme.py --list                         # the commands, and which would run

Every line of a ```bash block is one command (backslash continuations and lines inside quotes
joined, comments dropped).
Commands that need what an offline machine lacks (the released BGE-M3 weights from the Hugging
Face hub, your own data under data/, a TPU VM or cluster) are listed as skipped with the reason;
the rest run in README order in the clone, through bash with the README's virtual environment
(.venv) active once the first command has made it. The first failure stops the run. The table at
the end gives each command's wall time, which is where the README's timings come from.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Why a command cannot run on an offline machine with only this repository: (pattern, reason).
SKIPPED = (
    (r"BAAI/bge-m3|checkpoints/bge-m3", "needs the released weights (Hugging Face hub)"),
    (r"gcloud|/mnt/|\$TPU|TPU=|--index-url|<you>", "needs a TPU VM or a cluster"),
    (r"(?<![\w/.])data/", "needs your own data"),
    (r"/tmp/fe\b|FlagEmbedding", "needs the official implementation's environment"),
    (r"benchmark(_\w+)?\.py", "is a benchmark (minutes to hours)"),
)


@dataclasses.dataclass(frozen=True)
class Command:
    line: int  # README line where it starts
    text: str
    skip: str | None  # why it does not run here; None: it runs


def readme_commands(readme: str) -> list[Command]:
    """The commands of every ```bash block of `readme`, in order."""
    commands, block, pending, start = [], False, "", 0
    for number, raw in enumerate(readme.splitlines(), start=1):
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line and not pending:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\") and quotes_closed(pending):
            text = " ".join(pending.split())
            skip = next((why for pattern, why in SKIPPED if re.search(pattern, text)), None)
            commands.append(Command(start, text, skip))
            pending = ""
    return commands


def quotes_closed(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:  # "No closing quotation": the command goes on on the next line
        return False
    return True


def run_all(commands: list[Command], clone: Path) -> list[tuple[Command, float, int]]:
    """(command, seconds, exit code) of each runnable command run in `clone`, until one fails."""
    results = []
    for command in commands:
        if command.skip:
            continue
        script = f"if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi\n{command.text}\n"
        print(f"README:{command.line}: {command.text}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(["bash", "-c", script], cwd=clone).returncode
        results.append((command, time.perf_counter() - start, code))
        if code:
            break
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clone", type=Path, help="a new directory to clone this checkout into")
    parser.add_argument("--list", action="store_true", help="list the commands only")
    args = parser.parse_args()
    commands = readme_commands((ROOT / "README.md").read_text())
    if args.list or args.clone is None:
        for c in commands:
            print(f"README:{c.line:<4} {'skip: ' + c.skip if c.skip else 'runs':<54} {c.text}")
        return 0
    if args.clone.exists():
        print(f"error: --clone {args.clone}: already exists; expected a new directory")
        return 2
    subprocess.run(["git", "clone", "-q", str(ROOT), str(args.clone)], check=True)
    results = run_all(commands, args.clone)
    print(f"\n{'README':<8}{'seconds':>9}{'exit':>6}  command")
    for command, seconds, code in results:
        print(f"{command.line:<8}{seconds:>9.1f}{code:>6}  {command.text[:100]}")
    skipped = sum(c.skip is not None for c in commands)
    print(f"{len(results)} run, {skipped} skipped (--list says why)")
    return int(any(code for _, _, code in results))


if __name__ == "__main__":
    sys.exit(main())
