"""Fine-tune BGE-M3 on GPUs: the tpu_v4 recipe with cuDNN fused attention.

python train/main.py --config configs/gpu.py --config.model.init_from=checkpoints/bge-m3
"""

from configs import base, tpu_v4


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = tpu_v4.get_config(arg)
    c.workdir = "runs/gpu"
    c.model.attention_impl = "cudnn"
    c.train.dropout = False  # cuDNN attention has no attention-probability dropout
    return c
