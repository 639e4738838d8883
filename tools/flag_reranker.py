"""FlagEmbedding's `FlagReranker`, the reference for m3_jax's Reranker (tests/test_reranker.py and
tools/benchmark_rerank.py).

    python tools/flag_reranker.py MODEL_DIR PAIRS.json OUT.json --batch-size 32 --max-length 512

FlagEmbedding 1.4.2 tokenizes reranker pairs with `tokenizer.prepare_for_model`, which the fast
tokenizers of transformers 5 (what m3_jax uses) no longer have, so its `compute_score` cannot
run beside m3_jax. It runs in a child process instead, whose imports see a side environment
first: transformers 4.57 with the tokenizers and huggingface_hub it accepts, and FlagEmbedding,
installed by pip without dependencies into a cache directory (torch and numpy come from the
calling environment). FlagEmbedding's package `__init__` imports its training code (datasets,
peft, ...), so only the encoder-only reranker module and its base class are loaded. This file
imports nothing from m3_jax.

As a script: one warm-up `compute_score` call, then --repeats timed calls; OUT.json holds the
scores, the fastest seconds and the warm-up seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

SIDE_PACKAGES = (
    "flagembedding==1.4.2",
    "transformers==4.57.6",  # the newest transformers 4
    "tokenizers==0.22.1",
    "huggingface_hub==0.36.0",
)


def side_environment(cache_root: Path) -> Path:
    """The side environment's directory, installed on first use (about 140 MB, 20 s)."""
    name = "-".join(p.replace("==", "") for p in SIDE_PACKAGES)
    target = cache_root / "flag_reranker_env" / name
    if not (target / ".complete").is_file():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*command, str(target), *SIDE_PACKAGES], check=True, capture_output=True)
        (target / ".complete").touch()
    return target


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m3_jax"


def run_flag_reranker(side_env: Path, model_dir: Path, pairs: list, out: Path, **options) -> dict:
    """Runs this script in a child process; its OUT.json. options: batch_size, max_length,
    normalize, repeats."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs_file = out.with_suffix(".pairs.json")
    pairs_file.write_text(json.dumps(pairs, ensure_ascii=False))
    command = [sys.executable, __file__, str(model_dir), str(pairs_file), str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [] if value is False else [flag, str(value)]
    env = dict(os.environ, PYTHONPATH=str(side_env))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"FlagReranker failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def import_flag_reranker():
    spec = importlib.util.find_spec("FlagEmbedding")
    root = Path(spec.submodule_search_locations[0])
    packages = (
        "FlagEmbedding",
        "FlagEmbedding.abc",
        "FlagEmbedding.abc.inference",
        "FlagEmbedding.inference",
        "FlagEmbedding.inference.reranker",
        "FlagEmbedding.inference.reranker.encoder_only",
    )
    for name in packages:  # bare packages: their __init__ files import the training code
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = package
    base = importlib.import_module("FlagEmbedding.abc.inference.AbsReranker")
    sys.modules["FlagEmbedding.abc.inference"].AbsReranker = base.AbsReranker
    module = importlib.import_module("FlagEmbedding.inference.reranker.encoder_only.base")
    return module.BaseReranker  # what `from FlagEmbedding import FlagReranker` names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("pairs", type=Path, help="a JSON list of [query, passage]")
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=128)  # FlagReranker's default
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--normalize", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    args = parser.parse_args()
    import transformers

    if not transformers.__version__.startswith("4."):
        sys.exit(f"FlagReranker needs transformers 4, found {transformers.__version__}")
    pairs = json.loads(args.pairs.read_text())
    reranker = import_flag_reranker()(args.model_dir, use_fp16=False, devices=["cpu"])
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, normalize=args.normalize)
    start = time.perf_counter()
    scores = reranker.compute_score(pairs, **kw)
    warmup = time.perf_counter() - start
    best = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        reranker.compute_score(pairs, **kw)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    result = {"scores": scores, "warmup_seconds": warmup, "best_seconds": best}
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
