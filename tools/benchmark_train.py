"""Training-step throughput of m3_jax against PyTorch on the same weights and batch.

    python tools/benchmark_train.py --geometry tiny
    python tools/benchmark_train.py --geometry base --queries 4 --group-size 4 --train-steps 2
    python tools/benchmark_train.py --geometry tiny --teacher  # m3_kd_loss on teacher scores

Both sides start from identical random weights (m3_jax.tiny.random_params) in the geometry asked
for and apply optimizer updates on a fixed batch of B queries with G passages each (right-padded
to Lq and Lp): the unified M3 loss with self-distillation, as FlagEmbedding's
EncoderOnlyEmbedderM3Model computes it, no dropout, gradient clipping 1.0, AdamW, fp32. m3_jax
runs its jitted `train_step` (state donated, compile timed separately); PyTorch runs transformers'
XLMRobertaModel (sdpa attention by default) with the same loss (tools/torch_m3.py). The sides
alternate step by step and the fastest step of each is kept, so background load hits both alike.
The first-step losses must agree. FLOPs come from m3_jax.flops.train_flops (padded tokens); MFU is
against the matmul peak measured in the same run.

Prints a table; --json writes the results.
"""

from __future__ import annotations

import collections
import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import base_parser, model_config, print_table, start_run, texts_of_lengths
from torch_m3 import make_train_step, torch_m3

from m3_jax.config import LossConfig, OptimConfig
from m3_jax.flops import mfu, train_flops
from m3_jax.model import graphdef
from m3_jax.tiny import random_params, train_tokenizer
from m3_jax.tokenization import load_tokenizer
from m3_jax.training.optim import make_optimizer
from m3_jax.training.sharded import LR_SPEC
from m3_jax.training.state import init_state
from m3_jax.training.step import StepConfig, train_step


def train_batch(args, tokenizer) -> dict[str, np.ndarray]:
    """B queries and B*G passages of mixed lengths, right-padded to Lq / Lp; random teacher
    scores [B, G] with --teacher."""
    b, g, lq, lp = args.queries, args.group_size, args.query_length, args.passage_length

    def tokenize(num, length, seed):
        lengths = np.random.default_rng(seed).integers(length // 4, length + 1, num)
        texts = texts_of_lengths(lengths, seed)
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
    step_fn = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef(config),
            tx=tx,
            config=StepConfig(loss_config, None, dropout=False, data_shards=1),
        ),
        donate_argnums=0,
    )
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = init_state(params, tx, seed=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, LR_SPEC).compile()
    compile_s = time.perf_counter() - start

    done = 0  # updates applied: the schedule's step

    def step():
        nonlocal state, done
        state, metrics = compiled(state, batch, np.float32(schedule(done)))
        done += 1
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
    loss_config = LossConfig(num_shards=1)  # one process: every query is in one local group
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


def parse_args():
    parser = base_parser(__doc__)
    parser.add_argument("--queries", type=int, default=8, help="B, queries per step")
    parser.add_argument("--group-size", type=int, default=8, help="G, passages per query")
    parser.add_argument("--query-length", type=int, default=32, help="Lq, padded query length")
    parser.add_argument("--passage-length", type=int, default=128, help="Lp, padded passage length")
    parser.add_argument(
        "--train-steps", type=int, default=5, help="timed steps per side (the fastest is kept)"
    )
    parser.add_argument("--teacher", action="store_true", help="random teacher scores (m3_kd_loss)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    results, peak = start_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(train_tokenizer(Path(tmp) / "tokenizer", seed=args.seed))
        longest = max(args.query_length, args.passage_length)
        config = model_config(args, len(tokenizer), longest)
        params = random_params(config, args.seed)
        results["train"] = run_train(args, config, params, tokenizer, peak)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
