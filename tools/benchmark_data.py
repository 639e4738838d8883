"""Benchmark the training data path: prepare throughput, training start-up, host batches/s.

    python tools/benchmark_data.py                    # N = 20k, 200k, 2M (hours on 2 cores)
    python tools/benchmark_data.py --sizes 20000,200000

For each N it writes N synthetic FlagEmbedding records (a query of 5-15 words, 1 positive and 7
negatives drawn from a corpus of 2N passages of 50-300 words, `--passage-words`; teacher
scores), then measures:

- the bare tokenizer on the distinct texts of the first 20k records, one core (the reference):
  the transformers call, and its Rust backend called directly (what prepare calls, without
  converting each encoding to Python dicts);
- `m3-jax data prepare` with 1 and 2 workers: tokens/s, and the ratios to the tokenizer and to
  one worker;
- the demo config trained for 2 steps on the prepared set, in a fresh process: wall time with a
  cold compilation cache and with a warm one, and peak memory (what grows with the data is the
  difference to the smallest N; a cold start also compiles one program per length bucket used);
- the loader alone: host batches/s over 50 batches.

Token counts are those of the distinct texts (queries and passages), as prepared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
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
from m3_jax.tokenization import load_tokenizer, tokenize  # noqa: E402

TOKENIZER = ROOT / "train/demo_data/tokenizer"
WORDS = [
    "".join(chr(97 + c) for c in np.random.default_rng(i).integers(0, 26, 2 + i % 7))
    for i in range(5000)
]


def write_records(path: Path, n: int, words: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    corpus_size = 2 * n  # each passage is referenced 4.5 times on average

    def text(lo: int, hi: int) -> str:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))

    corpus = [text(*words) for _ in range(corpus_size)]
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


def bare_tokenizer_tokens_per_s(path: Path, records: int = 20_000) -> tuple[float, float]:
    """One core, the distinct texts of the first `records` records (a rate per token, which the
    data's size does not change) and prepare's max lengths, in batches of 1024: (tokens/s of the
    transformers call `tokenizer(texts, truncation=True, max_length=...)`, tokens/s of its Rust
    backend called directly, as `m3_jax.tokenization.tokenize` does)."""
    tokenizer = load_tokenizer(TOKENIZER)
    queries, passages = [], set()
    for line in itertools.islice(path.open(encoding="utf-8"), records):
        row = json.loads(line)
        queries.append(row["query"])
        passages.update(row["pos"] + row["neg"])
    work = ((queries, 512), (sorted(passages), 8192))

    def transformers_call(texts, limit):
        return tokenizer(texts, truncation=True, max_length=limit)["input_ids"]

    def backend_call(texts, limit):
        return tokenize(tokenizer, texts, limit)

    rates = []
    for call in (transformers_call, backend_call):
        start = time.perf_counter()
        tokens = 0
        for texts, limit in work:
            for i in range(0, len(texts), 1024):
                tokens += sum(len(x) for x in call(texts[i : i + 1024], limit))
        rates.append(tokens / (time.perf_counter() - start))
    return rates[0], rates[1]


def prepare_tokens_per_s(path: Path, out: Path, workers: int) -> tuple[float, object]:
    settings = PrepareSettings(tokenizer=str(TOKENIZER))
    start = time.perf_counter()
    result = prepare([path], out, settings, num_workers=workers, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    m = result.manifest
    return (m.query_tokens + m.passage_tokens) / seconds, m


def train_start(prepared: Path, work: Path, xla_cache: Path) -> tuple[float, float]:
    """(seconds, peak MiB) of the demo config trained for 2 steps in `work` (a new run), in a
    fresh process."""
    shutil.rmtree(work, ignore_errors=True)
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
        f"--config.train.compilation_cache_dir={xla_cache}",
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
    parser.add_argument(
        "--passage-words", default="50,300", help="passage lengths in words: MIN,MAX (exclusive)"
    )
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per tokenizer, as in the workers
    root = args.workdir or Path(tempfile.mkdtemp(prefix="m3_bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        words = tuple(int(x) for x in args.passage_words.split(","))
        path = root / f"train-{n}-w{words[0]}-{words[1]}.jsonl"
        write_records(path, n, words)
        bare, rust = bare_tokenizer_tokens_per_s(path)
        one, manifest = prepare_tokens_per_s(path, root / f"prepared-{n}-w1", 1)
        two, _ = prepare_tokens_per_s(path, root / f"prepared-{n}-w2", 2)
        # A compilation cache of each N's own: the first start compiles cold, the second finds
        # every program cached (what start-up costs apart from compiling).
        xla_cache = root / f"xla-{n}"
        shutil.rmtree(xla_cache, ignore_errors=True)
        cold_s, cold_peak = train_start(root / f"prepared-{n}-w1", root / f"run-{n}", xla_cache)
        warm_s, warm_peak = train_start(root / f"prepared-{n}-w1", root / f"run-{n}", xla_cache)
        batches = loader_batches_per_s(root / f"prepared-{n}-w1")
        peak_mib = max(cold_peak, warm_peak)
        rows.append((n, manifest.passages, bare, rust, one, two, cold_s, warm_s, peak_mib, batches))
        print_table(rows)


def print_table(rows) -> None:
    head = (
        f"{'records':>9} {'passages':>9} {'tokenizer tok/s':>16} {'rust tok/s':>11} "
        f"{'prepare 1w':>11} {'1w/tok':>7} {'1w/rust':>8} {'prepare 2w':>11} {'2w/1w':>6} "
        f"{'start s':>8} {'warm s':>7} {'peak MiB':>9} {'batches/s':>10}"
    )
    print(head)
    for n, passages, bare, rust, one, two, cold_s, warm_s, peak, batches in rows:
        print(
            f"{n:>9} {passages:>9} {bare:>16.0f} {rust:>11.0f} {one:>11.0f} {one / bare:>7.2f} "
            f"{one / rust:>8.2f} {two:>11.0f} {two / one:>6.2f} {cold_s:>8.1f} {warm_s:>7.1f} "
            f"{peak:>9.0f} {batches:>10.1f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
