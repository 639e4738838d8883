"""Fine-tune BGE-M3 on a TPU v4 slice with the paper's unified recipe (M3_SPEC §5, §11.2).

    python tools/convert_from_pytorch.py BAAI/bge-m3 checkpoints/bge-m3
    python train/main.py --config configs/tpu_v4.py --config.data.train_files=data/

Full BGE-M3 geometry from the imported weights, bf16 compute with fp32 params and scores,
query/passage lengths 512/8192, 1 positive + 7 negatives, self-distillation, FlagEmbedding's
per-length batch table times the number of devices.
"""

from configs import base


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config(arg)
    c.workdir = "runs/tpu_v4"
    c.model.init_from = "checkpoints/bge-m3"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.attention_impl = "xla"
    c.data.train_files = "data/"
    c.data.group_size = 8
    c.data.query_max_len = 512
    c.data.passage_max_len = 8192
    c.data.batch_size_preset = "flag_embedding"
    c.data.batch_multiple = -1  # -1: the number of devices
    c.data.max_batch_size = 4096
    c.loss.num_shards = -1  # local groups per device, like the reference's per-GPU losses
    c.optim.lr = 1e-5
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.train.num_epochs = 1
    c.train.save_every = 1000
    return c
