"""Train an M3 model: python train/main.py --config configs/demo_cpu.py [--config.optim.lr=1e-4]"""

import logging
import sys
from pathlib import Path

# Config files import each other as `configs.*`, which lives at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m3_jax.evaluation.heldout import evaluate_heldout  # noqa: E402
from m3_jax.sharding import initialize_distributed  # noqa: E402
from m3_jax.training.loop import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.mark_flags_as_required(["config"])


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
    eval_fn = None
    if cfg.eval.heldout_file:
        eval_fn = lambda model_config, params: evaluate_heldout(  # noqa: E731
            model_config,
            params,
            cfg.model.tokenizer or cfg.model.init_from,
            cfg.eval.heldout_file,
            cfg.eval.corpus_file,
            k=cfg.eval.k,
            batch_size=cfg.eval.batch_size,
        )
    summary = train(cfg, eval_fn)
    print(
        {k: v for k, v in summary.items() if k.startswith("eval") or k in ("final_step", "export")}
    )


if __name__ == "__main__":
    app.run(main)
