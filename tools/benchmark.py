"""Encode and training-step throughput of m3_jax against PyTorch on the same weights and inputs.

    python tools/benchmark.py --geometry tiny                  # encode + train, about a minute on 2 cores
    python tools/benchmark.py --geometry base --mode encode --num-texts 256 --max-length 512
    python tools/benchmark.py --geometry base --mode train --queries 4 --train-steps 3

Both sides start from identical random weights (m3_jax.tiny.random_params) and compute in fp32.

encode: dense + sparse + colbert outputs of mixed-length texts. PyTorch follows FlagEmbedding's
M3Embedder: texts sorted by length, each batch padded to its longest. m3_jax uses its static
length buckets.

train: optimizer updates on a fixed batch of B queries with G passages each (right-padded to Lq
and Lp): unified M3 loss with self-distillation (M3_SPEC §5), no dropout, gradient clipping 1.0,
AdamW. m3_jax runs its jitted `train_step` (state donated, compile timed separately); PyTorch runs
transformers' XLMRobertaModel (sdpa attention by default) with the same loss written in torch
(tools/torch_m3.py). The sides alternate step by step and the fastest step of each is kept, so
background load hits both alike. The first-step losses must agree. FLOPs come from
m3_jax.flops.train_flops (padded tokens); MFU is against the fp32 matmul peak measured in the
same run.

Prints a table per mode; --json writes all results.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch_m3 import make_train_step, torch_encode, torch_m3

from m3_jax import config as configs
from m3_jax.flops import measure_matmul_peak, mfu, train_flops
from m3_jax.inference import M3Embedder
from m3_jax.losses import LossConfig
from m3_jax.model.m3 import M3Model
from m3_jax.model_dir import model_from_params
from m3_jax.tiny import random_params, synthetic_corpus, train_tokenizer
from m3_jax.tokenization import load_tokenizer
from m3_jax.training.optim import OptimConfig, make_optimizer
from m3_jax.training.state import init_state
from m3_jax.training.step import StepConfig, train_step

GEOMETRIES = {"tiny": configs.tiny, "base": configs.base_size, "bge-m3": configs.bge_m3}
TOKENS_PER_WORD = 5.5  # of the tiny tokenizer on synthetic text, roughly


# Shared helpers --------------------------------------------------------------------------------


def mixed_length_texts(
    num_texts: int, max_words: int, seed: int, median_words: float = 33.0
) -> list[str]:
    """Log-normal word counts around `median_words`: many short texts, a tail up to `max_words`."""
    rng = np.random.default_rng(seed)
    words = " ".join(synthetic_corpus(4000, seed)).split()
    counts = rng.lognormal(mean=np.log(median_words), sigma=1.0, size=num_texts)
    counts = np.clip(counts, 3, max_words).astype(int)
    starts = rng.integers(0, len(words) - max_words, size=num_texts)
    return [" ".join(words[s : s + n]) for s, n in zip(starts, counts, strict=True)]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    """First column left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print(f"\n{title}")
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
    for note in notes:
        print(note)


# Encode ----------------------------------------------------------------------------------------


def run_encode(args, config, params, tokenizer) -> dict:
    texts = mixed_length_texts(args.num_texts, args.max_length, args.seed)
    real_tokens = sum(
        len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    )

    embedder = M3Embedder(
        model_from_params(config, params),
        tokenizer,
        batch_size=args.batch_size,
        show_progress=False,
    )
    kw = dict(
        max_length=args.max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    start = time.perf_counter()
    jax_out = embedder.encode(texts, **kw)
    first_call = time.perf_counter() - start
    jax_time = timed(lambda: embedder.encode(texts, **kw), args.repeats)

    model, colbert_linear, sparse_linear = torch_m3(config, params, args.torch_attention)
    run_torch = lambda: torch_encode(  # noqa: E731
        model, colbert_linear, sparse_linear, tokenizer, texts, args.batch_size, args.max_length
    )
    torch_out = run_torch()
    torch_time = timed(run_torch, args.repeats)

    results = {
        "num_texts": args.num_texts,
        "real_tokens": real_tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "m3_jax_tokens_per_s": real_tokens / jax_time,
        "torch_tokens_per_s": real_tokens / torch_time,
        "speedup": torch_time / jax_time,
        "m3_jax_first_call_s": first_call,
        "compiled_programs": embedder.compiled_program_count(),
        "max_abs_dense_diff": float(np.abs(jax_out["dense_vecs"] - torch_out[0]).max()),
    }
    print_table(
        f"encode, geometry={args.geometry}, {args.num_texts} texts, {real_tokens} real tokens, "
        "fp32, dense+sparse+colbert",
        ["implementation", "tokens/s", "ratio"],
        [
            [
                f"PyTorch ({args.torch_attention}, sorted, pad-to-longest)",
                f"{results['torch_tokens_per_s']:.0f}",
                "1.00",
            ],
            [
                "m3_jax (static buckets)",
                f"{results['m3_jax_tokens_per_s']:.0f}",
                f"{results['speedup']:.2f}",
            ],
        ],
        [
            f"m3_jax first call (incl. {results['compiled_programs']} compiles): "
            f"{first_call:.1f}s; max |dense diff| {results['max_abs_dense_diff']:.2e}"
        ],
    )
    return results


# Train -----------------------------------------------------------------------------------------


def train_batch(args, tokenizer) -> dict[str, np.ndarray]:
    """B queries and B*G passages of mixed lengths, right-padded to Lq / Lp; random teacher
    scores [B, G] with --teacher."""
    b, g, lq, lp = args.queries, args.group_size, args.query_length, args.passage_length

    def tokenize(num, length, seed):
        texts = mixed_length_texts(num, length, seed, median_words=length / 2 / TOKENS_PER_WORD)
        enc = tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    batch = {}
    batch["query_ids"], batch["query_mask"] = tokenize(b, lq, args.seed)
    batch["passage_ids"], batch["passage_mask"] = tokenize(b * g, lp, args.seed + 1)
    if args.teacher:
        rng = np.random.default_rng(args.seed)
        batch["teacher_scores"] = rng.normal(0.0, 2.0, (b, g)).astype(np.float32)
    return batch


def jax_trainer(config, params, batch, loss_config, optim_config, total_steps):
    """(step() -> loss, sync(), compile seconds) for the jitted, state-donating train_step."""
    tx, schedule = make_optimizer(optim_config, total_steps, params)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0))))
    step_fn = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            schedule=schedule,
            config=StepConfig(loss_config, dropout=False),
        ),
        donate_argnums=0,
    )
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = init_state(params, tx, seed=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    def step():
        nonlocal state
        state, metrics = compiled(state, batch)
        return metrics["loss/loss"]

    return step, lambda: jax.block_until_ready(state), compile_s


def torch_trainer(config, params, batch, loss_config, optim_config, total_steps, attention):
    model, colbert_linear, sparse_linear = torch_m3(config, params, attention)
    step = make_train_step(
        model,
        colbert_linear,
        sparse_linear,
        config.special_token_ids,
        loss_config,
        optim_config,
        total_steps,
    )
    batch = {
        k: torch.from_numpy(v if v.dtype == np.float32 else v.astype(np.int64))
        for k, v in batch.items()
    }
    return lambda: step(batch), lambda: None


def time_training(trainers: dict, steps: int) -> dict[str, dict]:
    """{name: (step() -> loss, sync())} → the loss of each side's first step (before any update),
    then the fastest of `steps` timed steps. The sides alternate step by step so that both see the
    same background load; the minimum is the estimate that load disturbs least."""
    out = {
        name: {"first_loss": float(step()), "seconds_per_step": float("inf")}
        for name, (step, _) in trainers.items()
    }
    for _ in range(steps):
        for name, (step, sync) in trainers.items():
            start = time.perf_counter()
            loss = step()
            sync()
            seconds = time.perf_counter() - start
            out[name]["seconds_per_step"] = min(out[name]["seconds_per_step"], seconds)
            out[name]["last_loss"] = float(loss)
    return out


def run_train(args, config, params, tokenizer, peak_flops: float) -> dict:
    batch = train_batch(args, tokenizer)
    real_tokens = int(batch["query_mask"].sum() + batch["passage_mask"].sum())
    padded = collections.Counter()
    padded[args.query_length] += batch["query_ids"].size
    padded[args.passage_length] += batch["passage_ids"].size
    flops = train_flops(config, padded)
    loss_config = LossConfig(group_size=args.group_size)
    optim_config = OptimConfig(lr=1e-5, warmup_steps=0)
    total_steps = 1 + args.train_steps
    common = (config, params, batch, loss_config, optim_config, total_steps)

    jax_step, jax_sync, compile_s = jax_trainer(*common)
    trainers = {
        "torch": torch_trainer(*common, args.torch_attention),
        "m3_jax": (jax_step, jax_sync),
    }
    sides = time_training(trainers, args.train_steps)
    for side in sides.values():
        seconds = side["seconds_per_step"]
        side["steps_per_s"] = 1.0 / seconds
        side["tokens_per_s"] = real_tokens / seconds
        side["flop_per_s"] = flops / seconds
        side["mfu"] = mfu(flops, seconds, peak_flops)
    ref, ours = sides["torch"], sides["m3_jax"]
    loss_rel_diff = abs(ours["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
    results = {
        "queries": args.queries,
        "group_size": args.group_size,
        "query_length": args.query_length,
        "passage_length": args.passage_length,
        "teacher_scores": args.teacher,
        "real_tokens_per_step": real_tokens,
        "padded_tokens_per_step": sum(padded.values()),
        "flop_per_step": flops,
        "matmul_peak_flop_per_s": peak_flops,
        "m3_jax_compile_s": compile_s,
        "speedup": ours["steps_per_s"] / ref["steps_per_s"],
        "first_loss_rel_diff": loss_rel_diff,
        **{f"{name}_{k}": v for name, side in sides.items() for k, v in side.items()},
    }

    def row(label, side, ratio):
        return [
            label,
            f"{side['steps_per_s']:.3g}",
            f"{side['tokens_per_s']:.0f}",
            f"{ratio:.2f}",
            f"{side['flop_per_s'] / 1e9:.1f}",
            f"{100 * side['mfu']:.1f}%",
            f"{side['first_loss']:.6f}",
            f"{side['last_loss']:.6f}",
        ]

    teacher = "m3_kd_loss on random teacher scores" if args.teacher else "in-batch InfoNCE"
    print_table(
        f"train step, geometry={args.geometry}, B={args.queries} queries x G={args.group_size} "
        f"passages, Lq={args.query_length}, Lp={args.passage_length}, {real_tokens} real / "
        f"{sum(padded.values())} padded tokens per step, fp32, no dropout, unified loss "
        f"({teacher}) + self-distill, clip 1.0, AdamW",
        [
            "implementation",
            "steps/s",
            "tokens/s",
            "ratio",
            "GFLOP/s",
            "MFU",
            "first loss",
            "last loss",
        ],
        [
            row(f"PyTorch ({args.torch_attention} attention, eager mode)", ref, 1.0),
            row("m3_jax (jit, donated state)", ours, results["speedup"]),
        ],
        [
            f"m3_jax compile: {compile_s:.1f}s; {flops / 1e9:.1f} GFLOP per step; "
            f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s; {total_steps} steps per side, "
            f"alternating, fastest of the last {args.train_steps} kept",
            f"first-step loss: m3_jax {ours['first_loss']:.8f}, PyTorch {ref['first_loss']:.8f}, "
            f"relative difference {loss_rel_diff:.1e}"
            + ("" if loss_rel_diff < 1e-4 else "  ** MISMATCH (> 1e-4) **"),
        ],
    )
    return results


# Main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--mode", choices=("encode", "train", "all"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-attention",
        choices=("eager", "sdpa"),
        default="sdpa",
        help="transformers attention implementation of the PyTorch side",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    encode = parser.add_argument_group("encode")
    encode.add_argument("--num-texts", type=int, default=256)
    encode.add_argument("--max-length", type=int, default=512)
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument(
        "--repeats", type=int, default=2, help="timed encode runs per side (best is kept)"
    )
    train = parser.add_argument_group("train")
    train.add_argument("--queries", type=int, default=8, help="B, queries per step")
    train.add_argument("--group-size", type=int, default=8, help="G, passages per query")
    train.add_argument("--query-length", type=int, default=32, help="Lq, padded query length")
    train.add_argument("--passage-length", type=int, default=128, help="Lp, padded passage length")
    train.add_argument(
        "--train-steps", type=int, default=5, help="timed steps per side (the fastest is kept)"
    )
    train.add_argument("--teacher", action="store_true", help="random teacher scores (m3_kd_loss)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(train_tokenizer(Path(tmp) / "tok", seed=args.seed))
    longest = max(args.max_length, args.query_length, args.passage_length)
    config = GEOMETRIES[args.geometry](
        vocab_size=len(tokenizer), max_position_embeddings=longest + 2
    )
    params = random_params(config, args.seed)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.devices()[0].device_kind}"
    )
    print(f"machine: {machine}; load average {os.getloadavg()[0]:.1f} before the run")
    results = {"geometry": args.geometry, "machine": machine, "load_average": os.getloadavg()[0]}
    if args.mode in ("encode", "all"):
        results["encode"] = run_encode(args, config, params, tokenizer)
    if args.mode in ("train", "all"):
        results["train"] = run_train(args, config, params, tokenizer, measure_matmul_peak())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
