"""Stage 1 of M3-Embedding on a TPU v4 slice: RetroMAE pre-training of XLM-RoBERTa-large with
its position table extended to 8192 tokens (the paper's bge-m3-retromae).

    python train/main.py --config configs/tpu_v4_retromae.py --config.data.train_files=texts/
    m3-jax convert to-pytorch runs/tpu_v4_retromae/export out/m3-retromae   # PyTorch, if wanted
    python train/main.py --config configs/tpu_v4_unsupervised.py            # stage 2 from export/

The data is plain text, one `{"text": ...}` per jsonl line (the paper: Pile, Wudao, mC4). The
paper's settings: max length 8192, lr 7e-5, 32 texts x 16 accumulation steps = 512 texts per
update, 20,000 updates. Split-batch (`train.sub_batch_size` texts per chip per call) gives the
gradients of gradient accumulation, so a global batch is 512 texts whatever the slice. The
encoder masks 30% of the tokens and the decoder 50% (FlagEmbedding's defaults), each capped at
512 tokens per text as in the reference (`retromae.max_masked_tokens`; 0 lifts the cap).
Warm-up (10%) and weight decay (0.01) are this repository's defaults: the paper does not give
them. `model.max_length` tiles XLM-R's 512 learned positions into the 8192-token table when the
run starts; `m3-jax convert extend-positions` writes the same as a model directory.
The export/ directory holds the encoder with fresh colbert and sparse heads (the init of stage 2
and 3) and the trained MLM head (`mlm_head/`).
"""

from configs import base

GLOBAL_BATCH = 512  # 32 per GPU x 16 accumulation steps in the paper


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config()
    c.workdir = "runs/tpu_v4_retromae"
    c.objective = "retromae"
    c.model.init_from = "FacebookAI/xlm-roberta-large"
    c.model.max_length = 8192
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.attention_impl = "splash"  # the encoder's; the decoder's per-query masks run chunked
    c.model.attention_probs_dropout_prob = 0.0  # the splash kernel has no attention dropout
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.data.train_files = "texts/"
    c.data.group_size = 1  # one text per row
    c.data.query_max_len = 8  # plain-text records carry an empty query
    c.data.passage_max_len = 8192
    c.data.token_budget = GLOBAL_BATCH * (8 + 8192)  # every length bucket gets 512 texts
    c.data.max_batch_size = GLOBAL_BATCH
    c.optim.lr = 7e-5
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.train.num_steps = 20000
    c.train.sub_batch_size = 2  # texts per chip per model call (8192 tokens each at most)
    c.train.save_every = 1000
    if arg == "pod":
        c.distributed.initialize = True
    elif arg:
        raise ValueError(f"configs/tpu_v4_retromae.py takes no argument or ':pod', got {arg!r}")
    return c
