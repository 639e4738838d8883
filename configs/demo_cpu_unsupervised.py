"""Stage 2 of the CPU pipeline demo: dense-only contrastive pre-training with in-batch
negatives on the bundled pairs (train/demo_data/pairs.jsonl: query and positive, no mined
negatives, no teacher scores), from stage 1's export (configs/demo_cpu_retromae.py).

python train/main.py --config configs/demo_cpu_unsupervised.py    # -> runs/demo_cpu_unsupervised
"""

from configs import base
from configs.demo_cpu import DEMO_DATA


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config(arg)
    c.workdir = "runs/demo_cpu_unsupervised"
    c.model.init_from = "runs/demo_cpu_retromae/export"
    c.data.train_files = str(DEMO_DATA / "pairs.jsonl")
    c.data.group_size = 1  # in-batch negatives only
    c.data.query_max_len = 32
    c.data.passage_max_len = 512
    c.data.token_budget = 8192
    c.data.max_batch_size = 64
    c.loss.unified = False  # the dense head only
    c.loss.self_distill = False
    c.train.dropout = False
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.0
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.save_every = 250
    c.eval.heldout_file = str(DEMO_DATA / "heldout.jsonl")
    c.eval.corpus_file = str(DEMO_DATA / "heldout_corpus.jsonl")
    c.eval.metric = "dense/ndcg@10"
    return c
