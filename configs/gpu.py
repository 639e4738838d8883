"""Fine-tune BGE-M3 on GPUs: the tpu_v4 recipe with cuDNN fused attention.

    python train/main.py --config configs/gpu.py --config.model.init_from=checkpoints/bge-m3

FSDP over every GPU of the host (or of all hosts with ":multi", one process per host).
"""

from configs import base, tpu_v4


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = tpu_v4.get_config()
    c.workdir = "runs/gpu"
    c.model.attention_impl = "cudnn"
    c.model.attention_probs_dropout_prob = 0.0  # cuDNN attention has no attention dropout here
    if arg == "multi":
        c.distributed.initialize = True  # SLURM / Open MPI are detected; else set coordinator
    elif arg:
        raise ValueError(f"configs/gpu.py takes no argument or ':multi', got {arg!r}")
    return c
