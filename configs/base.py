"""Every training knob with its default. Other configs start from this one.

python train/main.py --config configs/base.py --config.data.train_files=data/ --config.model.init_from=ckpt
"""

from ml_collections import ConfigDict

from m3_jax.sharding import FSDP_RULES


def get_config(arg: str | None = None) -> ConfigDict:
    del arg
    c = ConfigDict()
    c.workdir = "runs/base"  # checkpoints, metrics.jsonl, tensorboard/, export/
    c.seed = 0  # init, data order, group sampling and dropout all derive from it

    c.model = ConfigDict()
    c.model.init_from = ""  # m3_jax dir, BGE-M3 PyTorch dir or hub id; "" = fresh init from preset
    c.model.fresh_heads = False  # allow a PyTorch checkpoint without colbert/sparse head files
    c.model.tokenizer = ""  # tokenizer dir; "" = the init_from dir
    c.model.preset = "bge_m3"  # m3_jax.config preset for a fresh init: bge_m3, base_size, tiny
    c.model.geometry = (
        ConfigDict()
    )  # ModelConfig field overrides for a fresh init (hidden_size=...)
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    c.model.param_dtype = "float32"  # parameter storage dtype
    c.model.attention_impl = "xla"  # xla, chunked (long inputs on CPU), cudnn (GPU), splash (TPU)
    c.model.attention_chunk_size = 512  # query block of the chunked attention
    c.model.attention_probs_dropout_prob = -1.0  # -1 = the model's; cudnn/splash train with 0
    c.model.remat = False  # recompute each layer in the backward pass (less memory, +1 forward)
    c.model.scan_layers = False  # lax.scan over the layers: one layer to compile instead of N

    c.data = ConfigDict()
    c.data.train_files = ""  # jsonl file, directory of them, or a list
    c.data.group_size = 8  # 1 positive + G-1 negatives per query (train_group_size)
    c.data.query_max_len = 512  # queries are truncated to this many tokens
    c.data.passage_max_len = 8192  # passages are truncated to this many tokens
    c.data.passage_buckets = (128, 256, 512, 1024, 2048, 4096, 8192)  # static passage lengths
    c.data.token_budget = 65536  # query + passage tokens per global batch (sets batch sizes)
    c.data.batch_size_preset = None  # "flag_embedding": the paper's per-length table instead
    c.data.max_batch_size = 1024  # cap on the global batch size of any bucket
    c.data.batch_multiple = -1  # global batch sizes are multiples of this; -1 = data-parallel size
    c.data.query_instruction = None  # prepended to every query, e.g. "Represent this query: "
    c.data.passage_instruction = None  # prepended to every passage
    c.data.knowledge_distillation = False  # use pos_scores/neg_scores as teacher scores
    c.data.sort_negatives_by_teacher = False  # old FlagEmbedding order for m3_kd_loss

    c.loss = ConfigDict()
    c.loss.temperature = 0.02  # every score is divided by it
    c.loss.unified = True  # sparse + colbert + ensemble losses; False = dense only
    c.loss.self_distill = True  # self-knowledge distillation from the ensemble
    c.loss.self_distill_start_step = -1  # self-distillation active when step > this
    c.loss.kd_loss_type = "m3_kd_loss"  # with teacher scores: m3_kd_loss or kl_div
    c.loss.in_batch_negatives = True  # False: each query sees only its own group
    c.loss.cross_device_negatives = True  # dense loss over the global batch
    c.loss.ddp_dense_grad_scale = False  # scale that dense gradient by 1/shards, as DDP does
    c.loss.num_shards = (
        -1
    )  # local groups for sparse/colbert/ensemble losses; -1 = data-parallel size
    c.loss.ensemble_weights = (1.0, 0.3, 1.0)  # dense, sparse, colbert inside the teacher score
    c.loss.loss_weights = (1.0, 0.1, 1.0)  # dense, sparse, colbert loss weights

    c.mesh = ConfigDict()
    c.mesh.data = 1  # data-parallel devices per slice (replicated params); -1 = the rest
    c.mesh.fsdp = -1  # fully sharded data-parallel devices per slice (params split); -1 = the rest
    c.mesh.tensor = 1  # tensor-parallel devices (attention heads and MLP split)
    c.mesh.dcn_data = 1  # multi-slice: slices along the data axis (over the data-centre network)
    c.mesh.dcn_fsdp = 1  # multi-slice: slices along the fsdp axis
    c.mesh.rules = FSDP_RULES  # logical parameter axis -> mesh axis (None = replicated)

    c.distributed = ConfigDict()
    c.distributed.initialize = False  # multi-process: jax.distributed.initialize() before anything
    c.distributed.coordinator_address = ""  # host:port of process 0; "" = detect (TPU pods, SLURM)
    c.distributed.num_processes = 0  # 0 = detect
    c.distributed.process_id = -1  # -1 = detect

    c.optim = ConfigDict()
    c.optim.lr = 1e-5  # peak learning rate
    c.optim.warmup_ratio = 0.1  # share of steps warming up linearly from 0
    c.optim.warmup_steps = None  # overrides warmup_ratio when set
    c.optim.weight_decay = 0.01  # AdamW decay, not on biases and LayerNorm
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.max_grad_norm = 1.0  # global-norm clipping; <= 0 disables
    c.optim.fix_encoder = False  # train only the colbert and sparse heads
    c.optim.fix_position_embedding = False  # freeze the position embeddings

    c.train = ConfigDict()
    c.train.num_steps = 0  # optimizer steps; 0 = num_epochs over the data
    c.train.num_epochs = 1  # used when num_steps is 0
    c.train.sub_batch_size = None  # split-batch: rows per device per encoder call (jax.checkpoint)
    c.train.dropout = True  # XLM-R dropout in training
    c.train.log_every = 10  # steps between metric lines
    c.train.save_every = 500  # steps between checkpoints
    c.train.keep_checkpoints = 3  # newest checkpoints kept
    c.train.async_checkpoint = True  # write checkpoints in the background
    c.train.compilation_cache_dir = "~/.cache/m3_jax/xla"  # persistent XLA cache; "" = off
    c.train.peak_flops_per_s = 0.0  # for MFU; 0 = measure a large matmul at start
    c.train.progress = True  # progress bars and metric lines on stdout

    c.eval = ConfigDict()
    c.eval.dataset = ""  # BEIR / MIRACL directory for retrieval evaluation (m3_jax.evaluation)
    c.eval.split = ""  # its qrels split ("" = test, else dev, else the only one)
    c.eval.modes = "dense,sparse,colbert,dense+sparse,all"  # retrieval modes evaluated
    c.eval.heldout_file = ""  # or: jsonl of held-out queries with relevant corpus ids (the demo)
    c.eval.corpus_file = ""  # jsonl corpus ({"id", "text"}) for the held-out queries
    c.eval.loss_files = ""  # jsonl in the training format: mean dev loss parts
    c.eval.every = 0  # steps between evaluations during training; 0 = only before and after
    c.eval.before_training = True  # also evaluate the initial model
    c.eval.metric = "all/ndcg@10"  # the metric that picks the best params, kept in best/
    c.eval.mode = "max"  # whether a larger (max) or smaller (min) metric is better
    c.eval.k = 10  # cutoff of nDCG@k, Recall@k, MRR@k
    c.eval.batch_size = 64  # encode batch size
    return c
