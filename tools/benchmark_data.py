"""Benchmark the training data path: prepare throughput, training start-up, host batches/s.

    python tools/benchmark_data.py                    # N = 20k, 200k, 2M (hours on 2 cores)
    python tools/benchmark_data.py --sizes 20000,200000

For each N it writes N synthetic FlagEmbedding records (a query of 5-15 words, 1 positive and 7
negatives drawn from a corpus of 2N passages of 50-300 words, teacher scores), then measures:

- the bare tokenizer on the same distinct texts, one core (the reference);
- `m3-jax data prepare` with 1 and 2 workers: tokens/s, and the ratios to the tokenizer and to
  one worker;
- the demo config trained for 2 steps on the prepared set, in a fresh process: wall time and
  peak memory (what grows with the data is the difference to the smallest N);
- the loader alone: host batches/s over 50 batches.

Token counts are those of the distinct texts (queries and passages), as prepared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ imports as a package

from configs import demo_cpu  # noqa: E402
from m3_jax.config import RunConfig  # noqa: E402
from m3_jax.data.pipeline import TrainLoader  # noqa: E402
from m3_jax.data.prepare import PrepareSettings, prepare  # noqa: E402
from m3_jax.data.prepared import PreparedSet  # noqa: E402
from m3_jax.tokenization import load_tokenizer  # noqa: E402

TOKENIZER = ROOT / "train/demo_data/tokenizer"
WORDS = [
    "".join(chr(97 + c) for c in np.random.default_rng(i).integers(0, 26, 2 + i % 7))
    for i in range(5000)
]


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    corpus_size = 2 * n  # each passage is referenced 4.5 times on average

    def text(lo: int, hi: int) -> str:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))

    corpus = [text(50, 300) for _ in range(corpus_size)]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            picks = rng.choice(corpus_size, 8, replace=False)
            row = {
                "query": text(5, 15),
                "pos": [corpus[picks[0]]],
                "neg": [corpus[i] for i in picks[1:]],
                "pos_scores": [float(rng.normal(3))],
                "neg_scores": [float(x) for x in rng.normal(0, 1, 7)],
            }
            f.write(json.dumps(row) + "\n")


def bare_tokenizer_tokens_per_s(path: Path) -> tuple[float, int]:
    """One core, the same distinct texts and max lengths as prepare."""
    tokenizer = load_tokenizer(TOKENIZER)
    queries, passages = [], set()
    for line in path.open(encoding="utf-8"):
        row = json.loads(line)
        queries.append(row["query"])
        passages.update(row["pos"] + row["neg"])
    start = time.perf_counter()
    tokens = 0
    for texts, limit in ((queries, 512), (sorted(passages), 8192)):
        for i in range(0, len(texts), 1024):
            ids = tokenizer(texts[i : i + 1024], truncation=True, max_length=limit)["input_ids"]
            tokens += sum(len(x) for x in ids)
    return tokens / (time.perf_counter() - start), tokens


def prepare_tokens_per_s(path: Path, out: Path, workers: int) -> tuple[float, object]:
    settings = PrepareSettings(tokenizer=str(TOKENIZER))
    start = time.perf_counter()
    result = prepare([path], out, settings, num_workers=workers, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    m = result.manifest
    return (m.query_tokens + m.passage_tokens) / seconds, m


def train_start(prepared: Path, work: Path) -> tuple[float, float]:
    """(seconds, peak MiB) of the demo config trained for 2 steps, in a fresh process."""
    command = [
        sys.executable,
        str(ROOT / "train/main.py"),
        f"--config={ROOT / 'configs/demo_cpu.py'}",
        f"--config.workdir={work}",
        f"--config.data.train_files={prepared}",
        "--config.train.num_steps=2",
        "--config.train.progress=False",
        "--config.train.peak_flops_per_s=1e11",
        "--config.eval.heldout_file=",
        f"--config.model.tokenizer={TOKENIZER}",
        # A cache of its own: every N compiles cold, so the start-ups compare.
        f"--config.train.compilation_cache_dir={work.with_name(work.name + '-xla')}",
    ]
    # A fresh parent whose only child is the run, so that its children's peak RSS is the run's.
    measure = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, *command], check=True, capture_output=True, text=True
    )
    seconds, peak_kib = out.stdout.split()
    return float(seconds), int(peak_kib) / 1024


def loader_batches_per_s(prepared: Path, batches: int = 50) -> float:
    data = RunConfig.from_config_dict(demo_cpu.get_config()).data
    loader = TrainLoader([PreparedSet(prepared)], data, seed=0, batch_multiple=8, pad_id=1)
    iterator = loader.iterate()
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="20000,200000,2000000", help="record counts")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per tokenizer, as in the workers
    root = args.workdir or Path(tempfile.mkdtemp(prefix="m3_bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        path = root / f"train-{n}.jsonl"
        write_records(path, n)
        bare, _ = bare_tokenizer_tokens_per_s(path)
        one, manifest = prepare_tokens_per_s(path, root / f"prepared-{n}-w1", 1)
        two, _ = prepare_tokens_per_s(path, root / f"prepared-{n}-w2", 2)
        start_s, peak_mib = train_start(root / f"prepared-{n}-w1", root / f"run-{n}")
        batches = loader_batches_per_s(root / f"prepared-{n}-w1")
        rows.append((n, manifest.passages, bare, one, two, start_s, peak_mib, batches))
        print_table(rows)


def print_table(rows) -> None:
    head = (
        f"{'records':>9} {'passages':>9} {'tokenizer tok/s':>16} {'prepare 1w':>11} "
        f"{'1w/tok':>7} {'prepare 2w':>11} {'2w/1w':>6} {'start s':>8} {'peak MiB':>9} "
        f"{'batches/s':>10}"
    )
    print(head)
    for n, passages, bare, one, two, start_s, peak, batches in rows:
        print(
            f"{n:>9} {passages:>9} {bare:>16.0f} {one:>11.0f} {one / bare:>7.2f} {two:>11.0f} "
            f"{two / one:>6.2f} {start_s:>8.1f} {peak:>9.0f} {batches:>10.1f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
