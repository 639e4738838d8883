"""FlagEmbedding's `FlagReranker`, run as the reference for m3_jax's Reranker.

FlagEmbedding 1.4.2 tokenizes reranker pairs with `tokenizer.prepare_for_model`, which
transformers 5 (what m3_jax uses) no longer has on its fast tokenizers, so its `compute_score`
cannot run beside m3_jax. The reference therefore runs in a child process whose imports see a
small side environment first: transformers 4.57 and its tokenizers / huggingface_hub, and
FlagEmbedding itself, all installed without dependencies by pip into a cache directory (torch and
numpy come from the test environment). FlagEmbedding's package `__init__` imports its training
code (datasets, peft, ...); only the encoder-only reranker module and its base class are loaded.

Run as a script: `python flag_reranker.py MODEL_DIR PAIRS_JSON KWARGS_JSON` prints the scores.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

FLAG_EMBEDDING = "flagembedding==1.4.2"
# The newest transformers 4 and the tokenizers / huggingface_hub releases it accepts.
SIDE_PACKAGES = (
    FLAG_EMBEDDING,
    "transformers==4.57.6",
    "tokenizers==0.22.1",
    "huggingface_hub==0.36.0",
)


def side_environment(cache_root: Path) -> Path:
    """The side environment's directory, installed on first use (about 140 MB, 20 s)."""
    target = cache_root / "flag_reranker_env" / "-".join(p.replace("==", "") for p in SIDE_PACKAGES)
    if not (target / ".complete").is_file():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*command, str(target), *SIDE_PACKAGES], check=True, capture_output=True)
        (target / ".complete").touch()
    return target


def flag_reranker_scores(
    side_env: Path, model_dir: Path, pairs: list[tuple[str, str]], **kwargs
) -> list[float]:
    """`FlagReranker(model_dir, devices=['cpu']).compute_score(pairs, **kwargs)`."""
    env = dict(os.environ, PYTHONPATH=str(side_env))
    result = subprocess.run(
        [sys.executable, __file__, str(model_dir), json.dumps(pairs), json.dumps(kwargs)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _import_flag_reranker():
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


if __name__ == "__main__":
    model_dir, pairs, kwargs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    import transformers

    assert transformers.__version__.startswith("4."), transformers.__version__
    reranker = _import_flag_reranker()(model_dir, use_fp16=False, devices=["cpu"])
    print(json.dumps(reranker.compute_score(pairs, **kwargs)))
