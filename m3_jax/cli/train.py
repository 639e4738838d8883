"""Train an M3 model from a config file (the entry point behind `m3-jax train` and train/main.py).

    m3-jax train --config configs/demo_cpu.py
    m3-jax train --config configs/tpu_v4.py:pod --config.optim.lr=1e-5 --config.workdir=runs/x

--config FILE[:ARG] names a Python file whose `get_config(ARG)` returns an ml_collections
ConfigDict; any value is overridden with --config.KEY=VALUE (absl flags, parsed by ml_collections'
config_flags). --help lists every key with its default and what it does.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from m3_jax.config import EvalConfig, RunConfig
from m3_jax.evaluation import evaluate_heldout, evaluate_retrieval
from m3_jax.sharding import initialize_distributed
from m3_jax.training.loop import train

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


def train_from_config(run: RunConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Library chatter (orbax logs every save at INFO through absl) would drown the metrics.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("m3_jax").setLevel(logging.INFO)
    if run.distributed.initialize:
        initialize_distributed(run.distributed)
    summary = train(run, eval_fn_from_config(run.eval))
    print(
        {k: v for k, v in summary.items() if k.startswith("eval") or k in ("final_step", "export")}
    )
    return summary


def run(argv: Sequence[str], prog: str = "m3-jax train") -> int:
    """Parses absl flags from `argv` (without the program name) and trains; once per process,
    since absl flags are global. A bad command line gives exit code 2."""
    spec = config_file(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(spec))
        return 0
    if spec is not None:
        path = Path(spec.partition(":")[0])
        if not path.is_file():
            print(f"{prog}: error: --config {path}: no such file", file=sys.stderr)
            return 2
        sys.path.insert(0, str(import_root(path)))
    config = config_flags.DEFINE_config_file("config", None, "FILE[:ARG]", lock_config=True)
    flags.mark_flags_as_required(["config"])
    try:
        flags.FLAGS([prog, *argv])
    # config_flags reports an override of a key the config lacks as an AttributeError.
    except (flags.Error, AttributeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        run = RunConfig.from_config_dict(config.value)
    except (TypeError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    train_from_config(run)
    return 0
