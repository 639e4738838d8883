"""Train an M3 model: python train/main.py --config configs/demo_cpu.py [--config.optim.lr=1e-4]

The same as `m3-jax train ...`; the logic lives in m3_jax/cli/train.py.
"""

import sys
from pathlib import Path

# So that a plain checkout runs without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3_jax.cli.train import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], prog=sys.argv[0]))
