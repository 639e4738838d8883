"""A tiny M3 model trained from scratch on the bundled synthetic data: minutes on 2 CPU cores.

python train/main.py --config configs/demo_cpu.py
"""

from configs import base


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config(arg)
    c.workdir = "runs/demo_cpu"
    c.model.tokenizer = "train/demo_data/tokenizer"
    c.model.preset = "tiny"
    c.model.geometry.max_position_embeddings = 514
    c.data.train_files = "train/demo_data/train.jsonl"
    c.data.group_size = 4
    c.data.query_max_len = 32
    c.data.passage_max_len = 512
    c.data.token_budget = 8192
    c.data.max_batch_size = 32
    c.data.knowledge_distillation = True
    c.train.dropout = False  # a 2-layer model trained for minutes underfits; dropout only slows it
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.train.num_steps = 1200  # the dense head needs ~1000 steps to beat its random init here
    c.train.log_every = 100
    c.train.save_every = 200
    c.eval.heldout_file = "train/demo_data/heldout.jsonl"
    c.eval.corpus_file = "train/demo_data/heldout_corpus.jsonl"
    return c
