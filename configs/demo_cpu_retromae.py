"""Stage 1 of the CPU pipeline demo: RetroMAE pre-training of a tiny model from scratch on the
bundled plain texts (train/demo_data/texts.jsonl). Minutes on 2 CPU cores.

python train/main.py --config configs/demo_cpu_retromae.py        # -> runs/demo_cpu_retromae
python train/main.py --config configs/demo_cpu_unsupervised.py    # stage 2, from its export/
python train/main.py --config configs/demo_cpu.py:pipeline        # stage 3, from stage 2's

The held-out nDCG@10 of the dense [CLS] embedding is measured before and after; the export/ is
the encoder (with fresh colbert and sparse heads) plus the MLM head, the next stage's init.
"""

from configs import base
from configs.demo_cpu import DEMO_DATA


def get_config(arg: str | None = None) -> "base.ConfigDict":
    c = base.get_config(arg)
    c.workdir = "runs/demo_cpu_retromae"
    c.objective = "retromae"
    c.model.tokenizer = str(DEMO_DATA / "tokenizer")
    c.model.preset = "tiny"
    c.model.geometry.max_position_embeddings = 514
    c.data.train_files = str(DEMO_DATA / "texts.jsonl")
    c.data.group_size = 1  # one text per row
    c.data.query_max_len = 8  # plain-text records have an empty query (<s></s>)
    c.data.passage_max_len = 512
    c.data.token_budget = 8192
    c.data.max_batch_size = 32
    c.train.dropout = False  # as in the other demo stages: minutes of training underfit anyway
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.0
    c.train.num_steps = 400
    c.train.log_every = 50
    c.train.save_every = 200
    c.eval.heldout_file = str(DEMO_DATA / "heldout.jsonl")
    c.eval.corpus_file = str(DEMO_DATA / "heldout_corpus.jsonl")
    c.eval.metric = "dense/ndcg@10"  # the colbert and sparse heads are untrained fresh ones
    return c
