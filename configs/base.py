"""Every training knob with its default: `m3_jax.config.run` defines and documents each one
(`m3-jax train --help` lists them). Other configs start from this one.

python train/main.py --config configs/base.py --config.data.train_files=data/ --config.model.init_from=ckpt
"""

from ml_collections import ConfigDict

from m3_jax.config import RunConfig


def get_config(arg: str | None = None) -> ConfigDict:
    del arg
    return RunConfig().to_config_dict()
