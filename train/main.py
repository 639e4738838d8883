"""Train an M3 model: python train/main.py --config configs/demo_cpu.py [--config.optim.lr=1e-4]"""

import logging
import sys
from pathlib import Path

# Config files import each other as `configs.*`, which lives at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import (
    ConfigDict,  # noqa: E402
    config_flags,  # noqa: E402
)

from m3_jax.evaluation import evaluate_retrieval  # noqa: E402
from m3_jax.evaluation.heldout import evaluate_heldout  # noqa: E402
from m3_jax.sharding import initialize_distributed  # noqa: E402
from m3_jax.training.loop import EvalFn, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.mark_flags_as_required(["config"])


def eval_fn_from_config(e: ConfigDict) -> EvalFn | None:
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


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Library chatter (orbax logs every save at INFO through absl) would drown the metrics.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("m3_jax").setLevel(logging.INFO)
    cfg = _CONFIG.value
    if cfg.distributed.initialize:
        d = cfg.distributed
        initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    summary = train(cfg, eval_fn_from_config(cfg.eval))
    print(
        {k: v for k, v in summary.items() if k.startswith("eval") or k in ("final_step", "export")}
    )


if __name__ == "__main__":
    app.run(main)
