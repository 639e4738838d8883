"""Train an M3 model from a config file (the entry point behind `m3-jax train` and train/main.py).

    m3-jax train --config configs/demo_cpu.py
    m3-jax train --config configs/tpu_v4.py:pod --config.optim.lr=1e-5 --config.workdir=runs/x

--config FILE[:ARG] names a Python file whose `get_config(ARG)` returns an ml_collections
ConfigDict; any value is overridden with --config.KEY=VALUE (absl flags, parsed by ml_collections'
config_flags). --help lists every key with its default and what it does.
"""

from __future__ import annotations

import difflib
import importlib.util
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from m3_jax.cli.common import report_errors, setup_logging
from m3_jax.config import EvalConfig, RunConfig
from m3_jax.evaluation import evaluate_heldout, evaluate_retrieval
from m3_jax.run_dir import BEST_DIR, SUMMARY_FILE
from m3_jax.sharding import initialize_distributed
from m3_jax.training.loop import train
from m3_jax.training.monitor import TrainingStopped

HELP_COLUMN = 52  # where --help starts each key's description


def config_file(argv: Sequence[str]) -> str | None:
    """The FILE[:ARG] value of --config in `argv`, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def import_root(path: Path) -> Path:
    """The directory from which a config file's package imports resolve: config files import
    each other as `configs.base`, so the first ancestor that is not a package goes on sys.path."""
    root = path.resolve().parent
    while (root / "__init__.py").is_file():
        root = root.parent
    return root


def load_config(spec: str) -> Any:
    """The ConfigDict of FILE[:ARG], as --config builds it."""
    path, _, arg = spec.partition(":")
    sys.path.insert(0, str(import_root(Path(path))))
    module_spec = importlib.util.spec_from_file_location("m3_jax_config_file", path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def help_text(spec: str | None) -> str:
    """This module's usage, then every config key: its value in FILE (the defaults without one)
    and its description."""
    config = RunConfig.from_config_dict(load_config(spec)) if spec else RunConfig()
    lines = ["usage: m3-jax train --config FILE[:ARG] [--config.KEY=VALUE ...]", "", __doc__]
    lines.append(f"Config keys and their values in {spec or 'the defaults'}:")
    for key, value, doc in config.doc_lines():
        flag = f"--config.{key}={value!r}"
        lines.append(f"  {flag:<{HELP_COLUMN}}  {doc}")  # a longer value pushes its doc right
    return "\n".join(lines)


def eval_fn_from_config(e: EvalConfig):
    """Retrieval evaluation on `eval.dataset` (BEIR / MIRACL), or the demo's held-out files."""
    if e.dataset:
        return lambda config, params, tokenizer_dir: evaluate_retrieval(
            config,
            params,
            tokenizer_dir,
            e.dataset,
            modes=e.modes.split(","),
            k=e.k,
            split=e.split or None,
            batch_size=e.batch_size,
        )
    if e.heldout_file:
        return lambda config, params, tokenizer_dir: evaluate_heldout(
            config,
            params,
            tokenizer_dir,
            e.heldout_file,
            e.corpus_file,
            k=e.k,
            batch_size=e.batch_size,
        )
    return None


def unknown_override(config: ConfigDict, argv: Sequence[str]) -> str | None:
    """The first `--config.KEY=VALUE` of `argv` whose KEY the config lacks, as a message with the
    nearest existing key; None when every key exists."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node: Any = config
        for depth, part in enumerate(key.split(".")):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(["config", *key.split(".")[:depth]])
                if not isinstance(node, ConfigDict):
                    return f"--config.{key}: {where} is a value, not a section"
                close = difflib.get_close_matches(part, list(node.keys()), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"--config.{key}: {where} has no key {part!r}{hint}"
            node = node[part]
    return None


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command line that reran as is resumes this run."""
    head = ["python", prog] if prog.endswith(".py") else shlex.split(prog)
    return shlex.join([*head, *argv])


def report(summary: dict, workdir: Path) -> str:
    """The end of a run for a person: steps, time, the last logged losses, every evaluation
    metric before and after training, and where the outputs are."""
    lines = [f"trained {summary['final_step']} steps in {summary['train_seconds']:.0f} s"]
    if summary.get("final_losses"):
        losses = ", ".join(f"{k} {v:.4f}" for k, v in summary["final_losses"].items())
        lines.append(f"last logged losses: {losses}")
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    if before or after:
        width = max(len(k) for k in [*before, *after])
        lines.append(f"  {'evaluation':<{width}}  {'before':>8}  {'after':>8}")
        for key in dict.fromkeys([*before, *after]):
            cells = [f"{d[key]:8.4f}" if key in d else f"{'-':>8}" for d in (before, after)]
            lines.append(f"  {key:<{width}}  {cells[0]}  {cells[1]}")
    lines.append(f"run directory  {workdir}")
    lines.append(
        f"export         {summary['export']}  (M3Embedder.from_pretrained, m3-jax convert)"
    )
    if "best" in summary:
        best = summary["best"]
        value = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k not in ("step", "dir"))
        lines.append(f"best           {workdir / BEST_DIR}  (step {best['step']}, {value})")
    lines.append(f"summary        {workdir / SUMMARY_FILE}")
    return "\n".join(lines)


def train_from_config(run: RunConfig, prog: str, argv: Sequence[str]) -> int:
    """Trains, then prints `report`; a stop signal prints the step saved and the command that
    resumes (exit code 128 + the signal's number, as a shell reports it)."""
    # Library chatter (orbax logs every save at INFO through absl) would drown the metrics.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if run.distributed.initialize:
        initialize_distributed(run.distributed)
    try:
        summary = train(run, eval_fn_from_config(run.eval))
    except TrainingStopped as stop:
        name = signal.Signals(stop.signum).name
        print(
            f"stopped by {name} after saving step {stop.step}; to resume, rerun: "
            + resume_command(prog, argv),
            file=sys.stderr,
        )
        return 128 + stop.signum
    print(report(summary, Path(run.workdir)))
    return 0


def run(argv: Sequence[str], prog: str = "m3-jax train") -> int:
    """Parses absl flags from `argv` (without the program name) and trains; once per process,
    since absl flags are global. A bad command line gives exit code 2, a user error 1."""
    spec = config_file(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(spec))
        return 0
    if spec is not None:
        path = Path(spec.partition(":")[0])
        if not path.is_file():
            print(f"{prog}: error: --config {path}: no such file", file=sys.stderr)
            return 2
        unknown = unknown_override(load_config(spec), argv)
        if unknown:
            print(f"{prog}: error: {unknown}", file=sys.stderr)
            return 2
    config = config_flags.DEFINE_config_file("config", None, "FILE[:ARG]", lock_config=True)
    flags.mark_flags_as_required(["config"])
    try:
        flags.FLAGS([prog, *argv])
    # config_flags reports an override of a key the config lacks as an AttributeError.
    except (flags.Error, AttributeError, KeyError) as e:
        print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    try:
        run_config = RunConfig.from_config_dict(config.value)
    except (TypeError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    setup_logging()
    return report_errors(lambda: train_from_config(run_config, prog, argv))
