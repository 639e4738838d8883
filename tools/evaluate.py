"""Retrieval evaluation of an M3 model in the paper's modes, on a BEIR- or MIRACL-format dataset.

    python tools/evaluate.py --model checkpoints/bge-m3 --data data/scifact \\
        --modes dense,sparse,colbert,dense+sparse,all --out results/scifact

The same as `m3-jax evaluate` (m3_jax/cli/evaluate.py): prints a table like the paper's (metrics
as rows, modes as columns) and writes OUT/metrics.json and one TREC run file per mode
(OUT/runs/<mode>.trec; OUT defaults to eval_results/<data dir name>). With --cache, corpus
embeddings are kept in resumable shards.
"""

from __future__ import annotations

import sys

from m3_jax.cli.common import tool_main
from m3_jax.cli.evaluate import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    return tool_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
