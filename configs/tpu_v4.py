"""Fine-tune BGE-M3 on a TPU v4 slice with the paper's unified recipe (self-knowledge distillation
over the dense, sparse and colbert heads; 1 positive + 7 mined negatives per query).

    python tools/convert_from_pytorch.py BAAI/bge-m3 checkpoints/bge-m3
    python train/main.py --config configs/tpu_v4.py --config.data.train_files=data/

    # multi-host slices (v4-16 and up): the same command on every worker, with ":pod"
    python train/main.py --config configs/tpu_v4.py:pod --config.workdir=/mnt/shared/runs/m3

Full BGE-M3 geometry from the imported weights, bf16 compute with fp32 params and scores, query /
passage lengths 512 / 8192, 1 positive + 7 negatives, self-distillation, Pallas splash attention,
FSDP over every chip of the slice (v4-8: 4 chips ... v4-64: 32), and FlagEmbedding's per-GPU batch
table (48 queries per chip for passages up to 500 tokens ... 8 beyond 7000) times the number of
chips. A chip holds 1/N of the params and AdamW state (tools/train_plan.py: 1.59 GiB on v4-8,
0.40 GiB on v4-32) and encodes 16 texts at a time under remat (split-batch).
"""

from configs import base


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config()
    c.workdir = "runs/tpu_v4"
    c.model.init_from = "checkpoints/bge-m3"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # compile one of the 24 layers
    c.model.attention_impl = "splash"
    c.model.attention_probs_dropout_prob = 0.0  # the splash kernel has no attention dropout
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over the whole slice
    c.data.train_files = "data/"
    c.data.group_size = 8
    c.data.query_max_len = 512
    c.data.passage_max_len = 8192
    c.data.batch_size_preset = "flag_embedding"  # per-chip table x data-parallel size
    c.data.max_batch_size = 4096
    c.loss.num_shards = -1  # local groups per chip, like the reference's per-GPU losses
    c.optim.lr = 1e-5
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.train.sub_batch_size = 16  # texts per chip per encoder call
    c.train.num_epochs = 1
    c.train.save_every = 1000
    if arg == "pod":
        # Every worker runs the same command; JAX finds the others through the TPU metadata.
        c.distributed.initialize = True
    elif arg:
        raise ValueError(f"configs/tpu_v4.py takes no argument or ':pod', got {arg!r}")
    return c
