"""Stage 2 of M3-Embedding on a TPU v4 slice: unsupervised contrastive pre-training of the dense
embedding on text pairs, from stage 1's RetroMAE export (the paper's bge-m3-unsupervised).

    python train/main.py --config configs/tpu_v4_retromae.py              # stage 1 -> export/
    python train/main.py --config configs/tpu_v4_unsupervised.py --config.data.train_files=pairs/

    # multi-host slices (v4-16 and up): the same command on every worker, with ":pod"
    python train/main.py --config configs/tpu_v4_unsupervised.py:pod --config.workdir=/mnt/runs/s2

The data is jsonl pairs, `{"query": ..., "pos": [...]}` with no (or an empty) "neg" (the paper:
1.2B pairs from MTP, S2ORC, Wikipedia, xP3, mC4, CC-News, NLLB, CCMatrix, CodeSearchNet). The
paper's settings: dense loss only, 1 passage per query, in-batch and cross-device negatives,
query / passage lengths 512 / 8192, lr 5e-5, warm-up 0.1, weight decay 0.01, 25,000 steps. Its
temperature is not stated; this is FlagEmbedding's default, 0.02.

Batches: FlagEmbedding's per-GPU table for one passage per query (700 queries for passages up to
500 tokens ... 104 beyond 7000) times the number of chips. 96 chips reproduce the paper's totals
(Table 9: 67,200 ... 9,984) exactly; a v4-32 (16 chips) gets 11,200 ... 1,664, a v4-64 (32 chips)
22,400 ... 3,328 and a v4-128 (64 chips) 44,800 ... 6,656. On a slice whose chip count divides 96
(v4-16, v4-32, v4-64), `--config.data.batch_multiple=96` gives the paper's totals there too: each
chip then encodes 96/N times the table's rows in split-batch calls. A bucket takes the table row of
its longest passage (the 512-token bucket: the 500-1000 row, 570 per chip).
The dense loss over such a batch is row-blocked (`loss.dense_row_block` query rows per chip at a
time), so no chip holds the [B, B] score matrix (18 GB in fp32 at 67,200).

`init_from` is stage 1's m3_jax export; `fresh_heads` also lets it be the published PyTorch
stage-1 checkpoint (BAAI/bge-m3-retromae), which has no colbert or sparse head. Only the dense
embedding is trained here: the heads reach stage 3 untrained (weight decay alone shrinks their
kernels, by about 0.6% over the run).
"""

from configs import base


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config()
    c.workdir = "runs/tpu_v4_unsupervised"
    c.model.init_from = "runs/tpu_v4_retromae/export"
    c.model.fresh_heads = True
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # compile one of the 24 layers
    c.model.attention_impl = "splash"
    c.model.attention_probs_dropout_prob = 0.0  # the splash kernel has no attention dropout
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over the whole slice
    c.data.train_files = "pairs/"
    c.data.group_size = 1  # the positive only: in-batch and cross-device negatives
    c.data.query_max_len = 512
    c.data.passage_max_len = 8192
    c.data.batch_size_preset = "flag_embedding"  # per-chip table (G=1 column) x chips
    c.data.max_batch_size = 0  # no cap: the table sets every batch
    c.loss.unified = False  # the dense loss only
    c.loss.self_distill = False
    c.loss.in_batch_negatives = True
    c.loss.cross_device_negatives = True
    c.loss.temperature = 0.02
    c.optim.lr = 5e-5
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.train.num_steps = 25000
    c.train.sub_batch_size = 16  # texts per chip per encoder call
    c.train.save_every = 1000
    if arg == "pod":
        # Every worker runs the same command; JAX finds the others through the TPU metadata.
        c.distributed.initialize = True
    elif arg:
        raise ValueError(f"configs/tpu_v4_unsupervised.py takes no argument or ':pod', got {arg!r}")
    return c
