"""Encode and training-step throughput of m3_jax against PyTorch on the same weights and inputs.

    python tools/benchmark.py --geometry tiny                  # encode + train, minutes on 2 cores
    python tools/benchmark.py --geometry base --mode encode --flag-embedding-python /tmp/fe/bin/python
    python tools/benchmark.py --geometry bge-m3 --mode encode --max-length 8192 --num-texts 64
    python tools/benchmark.py --geometry bge-m3 --mode encode --dtype bfloat16 --attention cudnn \
        --sides m3_jax                                         # a GPU: bf16 MFU, cuDNN attention

All sides start from identical random weights (m3_jax.tiny.random_params) in the geometry asked for.

encode: dense + sparse + colbert outputs of the same texts, whose token counts are drawn like a
real corpus (log-normal around 180 tokens, every 32nd from a tail up to --max-length). Each
implementation runs in a process of its own (its peak memory is its own), one warm-up call then
--repeats timed calls:
  - FlagEmbedding's BGEM3FlagModel, the official implementation, on the weights exported to the
    PyTorch layout (needs an interpreter that imports FlagEmbedding: --flag-embedding-python, since
    FlagEmbedding 1.x pins transformers 4.x; skipped when there is none);
  - transformers' XLMRobertaModel + heads (tools/torch_m3.py): FlagEmbedding's batching (sorted by
    length, each batch padded to its longest) without its Python post-processing;
  - m3_jax's M3Embedder: static length buckets, compile time per bucket reported.
The first side present is the reference (ratio 1.00). Useful FLOP/s count each text's matmuls at
its own length (no padding); MFU is against the matmul peak measured in the same run.

train: optimizer updates on a fixed batch of B queries with G passages each (right-padded to Lq
and Lp): unified M3 loss with self-distillation (M3_SPEC §5), no dropout, gradient clipping 1.0,
AdamW, fp32. m3_jax runs its jitted `train_step` (state donated, compile timed separately);
PyTorch runs transformers' XLMRobertaModel (sdpa attention by default) with the same loss
(tools/torch_m3.py). The sides alternate step by step and the fastest step of each is kept, so
background load hits both alike. The first-step losses must agree. FLOPs come from
m3_jax.flops.train_flops (padded tokens).

Prints a table per mode; --json writes all results.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import subprocess
import sys
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
from m3_jax.bucketing import plan_batches
from m3_jax.convert.to_torch import export_torch_dir
from m3_jax.flops import forward_flops_per_token, measure_matmul_peak, mfu, train_flops
from m3_jax.inference import M3Embedder
from m3_jax.losses import LossConfig
from m3_jax.model.m3 import M3Model
from m3_jax.model_dir import model_from_params
from m3_jax.tiny import random_params, synthetic_corpus, train_tokenizer
from m3_jax.tokenization import load_tokenizer
from m3_jax.training.optim import OptimConfig, make_optimizer
from m3_jax.training.sharded import LR_SPEC
from m3_jax.training.state import init_state
from m3_jax.training.step import StepConfig, train_step

GEOMETRIES = {"tiny": configs.tiny, "base": configs.base_size, "bge-m3": configs.bge_m3}
TOKENS_PER_WORD = 5.5  # of the tiny tokenizer on synthetic text, roughly


# Shared helpers --------------------------------------------------------------------------------


def texts_of_lengths(lengths, seed: int) -> list[str]:
    """Synthetic multi-script texts of about `lengths` tokens each (of the tiny tokenizer)."""
    words = " ".join(synthetic_corpus(4000, seed)).split()
    rng = np.random.default_rng(seed + 1)
    texts = []
    for length in lengths:
        n = max(1, int(length / TOKENS_PER_WORD))
        start = int(rng.integers(0, len(words) - n))
        texts.append(" ".join(words[start : start + n]))
    return texts


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
# Each implementation encodes in a process of its own, so that its peak memory is its own and
# FlagEmbedding can run under another interpreter (it pins transformers 4.x).


def corpus_lengths(num_texts: int, max_length: int, seed: int) -> np.ndarray:
    """Token counts like a real corpus: log-normal around 180 tokens (most texts short), every
    32nd text from a log-uniform tail between max_length / 16 and max_length, and the last text
    max_length long (so the longest bucket, and its memory, is always measured)."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(180.0), 1.0, num_texts)
    tail = np.arange(num_texts) % 32 == 31
    lengths[tail] = np.exp(rng.uniform(np.log(max_length / 16), np.log(max_length), tail.sum()))
    lengths[-1] = max_length
    return np.clip(lengths, 8, max_length).astype(int)


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    return [len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def warm_then_time(run, repeats: int):
    """(output of a first, warm-up call, its seconds, fastest of `repeats` further calls)."""
    start = time.perf_counter()
    output = run()
    return output, time.perf_counter() - start, timed(run, repeats)


def peak_memory_bytes(backend_device=None) -> int:
    """Peak device memory on accelerators, else the process's peak resident memory."""
    if backend_device is not None and backend_device.platform != "cpu":
        return int((backend_device.memory_stats() or {}).get("peak_bytes_in_use", 0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CompileLog:
    """Seconds spent tracing, lowering and compiling each jitted function, in call order."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.seconds: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if event in self.EVENTS and kwargs.get("fun_name") in (
            "_forward_impl",
            "jit(_forward_impl)",
        ):
            if event == self.EVENTS[0]:
                self.seconds.append(0.0)
            if self.seconds:
                self.seconds[-1] += duration


def encode_m3_jax(args, config, params, tokenizer, texts: list[str], out: Path) -> dict:
    compiles = CompileLog()
    embedder = M3Embedder(
        model_from_params(config, params),
        tokenizer,
        batch_size=args.batch_size,
        max_tokens_per_batch=args.max_tokens_per_batch,
        show_progress=False,
    )
    kw = dict(
        max_length=args.max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    output, first_call, seconds = warm_then_time(lambda: embedder.encode(texts, **kw), args.repeats)
    np.save(out / "dense.npy", output["dense_vecs"])
    lengths = token_lengths(tokenizer, texts, args.max_length)
    plan = plan_batches(lengths, embedder.bucket_spec, args.max_length)
    shapes = list(dict.fromkeys(b.shape for b in plan))  # first-dispatch order = compile order
    return {
        "seconds": seconds,
        "warmup_seconds": first_call,
        "peak_memory_bytes": peak_memory_bytes(jax.devices()[0]),
        "padded_tokens": sum(b.rows * b.length for b in plan),
        "padded_flops": sum(
            b.rows * b.length * forward_flops_per_token(config, b.length) for b in plan
        ),
        "compiles": [
            {"shape": list(shape), "seconds": s}
            for shape, s in zip(shapes, compiles.seconds, strict=False)
        ],
        "compiled_programs": embedder.compiled_program_count(),
    }


def encode_torch(args, config, params, tokenizer, texts: list[str], out: Path) -> dict:
    model, colbert_linear, sparse_linear = torch_m3(config, params, args.torch_attention)
    run = lambda: torch_encode(  # noqa: E731
        model, colbert_linear, sparse_linear, tokenizer, texts, args.batch_size, args.max_length
    )
    output, first_call, seconds = warm_then_time(run, args.repeats)
    np.save(out / "dense.npy", output[0])
    return {
        "seconds": seconds,
        "warmup_seconds": first_call,
        "peak_memory_bytes": peak_memory_bytes(),
    }


ENCODERS = {"m3_jax": encode_m3_jax, "torch": encode_torch}
LABELS = {
    "flag_embedding": "FlagEmbedding BGEM3FlagModel (official)",
    "torch": "transformers + heads ({attention}, sorted, pad-to-longest)",
    "m3_jax": "m3_jax M3Embedder ({attention}, static buckets)",
}


def run_encode_side(args) -> None:
    """Child process: one implementation encodes the texts; result.json and dense.npy in --work."""
    work = args.work
    tokenizer = load_tokenizer(work / "tokenizer")
    config = model_config(args, len(tokenizer))
    texts = json.loads((work / "texts.json").read_text())
    out = work / args.encode_side
    out.mkdir(exist_ok=True)
    params = random_params(config, args.seed)
    result = ENCODERS[args.encode_side](args, config, params, tokenizer, texts, out)
    (out / "result.json").write_text(json.dumps(result) + "\n")


def flag_embedding_python(args) -> str | None:
    """The interpreter that imports FlagEmbedding: --flag-embedding-python, else this one."""
    python = args.flag_embedding_python or sys.executable
    probe = subprocess.run(
        [python, "-c", "import FlagEmbedding"], capture_output=True, text=True, check=False
    )
    return python if probe.returncode == 0 else None


def child_args(args) -> list[str]:
    return [
        f"--geometry={args.geometry}",
        f"--seed={args.seed}",
        f"--max-length={args.max_length}",
        f"--batch-size={args.batch_size}",
        f"--max-tokens-per-batch={args.max_tokens_per_batch}",
        f"--repeats={args.repeats}",
        f"--torch-attention={args.torch_attention}",
        f"--attention={args.attention}",
        f"--dtype={args.dtype}",
        f"--query-length={args.query_length}",  # the position table's size depends on these
        f"--passage-length={args.passage_length}",
    ]


def run_encode(args, work: Path, config, tokenizer, peak_flops: float) -> dict:
    texts = texts_of_lengths(corpus_lengths(args.num_texts, args.max_length, args.seed), args.seed)
    (work / "texts.json").write_text(json.dumps(texts))
    lengths = token_lengths(tokenizer, texts, args.max_length)
    useful_flops = sum(n * forward_flops_per_token(config, n) for n in lengths)
    commands = {}
    for side in args.sides.split(","):
        if side in ENCODERS:
            commands[side] = [sys.executable, __file__, *child_args(args), f"--encode-side={side}"]
            commands[side].append(f"--work={work}")
        elif side == "flag_embedding":
            python = flag_embedding_python(args)
            if python is None:
                print("FlagEmbedding is not importable here (--flag-embedding-python): skipped")
                continue
            model_dir = work / "torch_model"
            params = random_params(config, args.seed)
            export_torch_dir(
                config, params, model_dir, tokenizer_source=work / "tokenizer", progress=False
            )
            commands[side] = [
                python,
                str(Path(__file__).with_name("flag_embedding_encode.py")),
                str(model_dir),
                str(work / "texts.json"),
                str(work / side),
                f"--batch-size={args.batch_size}",
                f"--max-length={args.max_length}",
                f"--colbert-dim={config.colbert_out_dim}",
                f"--repeats={args.repeats}",
            ]
        else:
            raise SystemExit(f"--sides: unknown implementation {side!r}")
    results: dict[str, dict] = {}
    reference, reference_dense = next(iter(commands)), None
    for side, command in commands.items():
        print(f"encoding with {side} ...", flush=True)
        subprocess.run(command, check=True)
        results[side] = json.loads((work / side / "result.json").read_text())
        dense = np.load(work / side / "dense.npy")
        if reference_dense is None:
            reference_dense = dense
        results[side]["max_abs_dense_diff_vs_" + reference] = float(
            np.abs(dense - reference_dense).max()
        )
    for side in results.values():
        side["tokens_per_s"] = sum(lengths) / side["seconds"]
        side["speedup"] = results[reference]["seconds"] / side["seconds"]
        side["useful_flop_per_s"] = useful_flops / side["seconds"]
        side["useful_mfu"] = mfu(useful_flops, side["seconds"], peak_flops)

    summary = {
        "num_texts": len(texts),
        "real_tokens": sum(lengths),
        "length_percentiles": {p: int(np.percentile(lengths, p)) for p in (10, 50, 90, 99, 100)},
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "matmul_peak_flop_per_s": peak_flops,
        "useful_flops": useful_flops,
        "reference": reference,
        "sides": results,
    }
    attention = {"torch": args.torch_attention, "m3_jax": args.attention}
    rows = [
        [
            LABELS[name].format(attention=attention.get(name, "")),
            f"{side['tokens_per_s']:.0f}",
            f"{side['speedup']:.2f}",
            f"{side['useful_flop_per_s'] / 1e9:.1f}",
            f"{100 * side['useful_mfu']:.1f}%",
            f"{side['peak_memory_bytes'] / 2**30:.2f}",
            f"{side['warmup_seconds']:.1f}",
        ]
        for name, side in results.items()
    ]
    notes = [
        "lengths (tokens) p10/p50/p90/p99/max: "
        + "/".join(str(v) for v in summary["length_percentiles"].values())
        + f"; matmul peak {peak_flops / 1e9:.1f} GFLOP/s ({args.dtype}); useful FLOPs count "
        "each text at its own length; first call = warm-up run (m3_jax: incl. compiles)",
    ]
    if "m3_jax" in results:
        ours = results["m3_jax"]
        notes.append(
            f"m3_jax: {ours['compiled_programs']} programs, compile seconds per bucket "
            + ", ".join(
                f"{c['shape'][0]}x{c['shape'][1]}: {c['seconds']:.1f}" for c in ours["compiles"]
            )
            + f"; {ours['padded_tokens']} padded tokens computed for {sum(lengths)} real"
        )
    notes += [
        f"max |dense - {reference}|: "
        + ", ".join(
            f"{n} {s['max_abs_dense_diff_vs_' + reference]:.1e}" for n, s in results.items()
        )
    ]
    print_table(
        f"encode, geometry={args.geometry}, {len(texts)} texts, {sum(lengths)} real tokens, "
        f"{args.dtype}, dense+sparse+colbert",
        [
            "implementation",
            "tokens/s",
            "ratio",
            "useful GFLOP/s",
            "MFU",
            "peak GiB",
            "first call s",
        ],
        rows,
        notes,
    )
    return summary


# Train -----------------------------------------------------------------------------------------


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
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M3Model(config, rngs=nnx.Rngs(0))))
    step_fn = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            config=StepConfig(loss_config, dropout=False),
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


def model_config(args, vocab_size: int):
    longest = max(args.max_length, args.query_length, args.passage_length)
    return GEOMETRIES[args.geometry](
        vocab_size=vocab_size,
        max_position_embeddings=longest + 2,
        dtype=args.dtype,
        attention_impl=args.attention,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--mode", choices=("encode", "train", "all"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="m3_jax compute dtype (params stay float32); bfloat16 on accelerators",
    )
    parser.add_argument(
        "--attention",
        choices=("xla", "chunked", "cudnn", "splash"),
        default="chunked",
        help="m3_jax attention (cudnn on GPUs, splash on TPUs)",
    )
    parser.add_argument(
        "--torch-attention",
        choices=("eager", "sdpa"),
        default="sdpa",
        help="transformers attention implementation of the PyTorch side",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    encode = parser.add_argument_group("encode")
    encode.add_argument(
        "--sides",
        default="flag_embedding,torch,m3_jax",
        help="implementations to run, the first present is the reference (ratio 1.00)",
    )
    encode.add_argument(
        "--flag-embedding-python",
        default=None,
        help="an interpreter that imports FlagEmbedding (default: this one; skipped if neither)",
    )
    encode.add_argument("--num-texts", type=int, default=256)
    encode.add_argument("--max-length", type=int, default=512)
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=65536,
        help="m3_jax bucket budget (rows x length)",
    )
    encode.add_argument(
        "--repeats", type=int, default=1, help="timed encode runs per side after the warm-up"
    )
    encode.add_argument("--encode-side", choices=sorted(ENCODERS), help=argparse.SUPPRESS)
    encode.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    train = parser.add_argument_group("train")
    train.add_argument("--queries", type=int, default=8, help="B, queries per step")
    train.add_argument("--group-size", type=int, default=8, help="G, passages per query")
    train.add_argument("--query-length", type=int, default=32, help="Lq, padded query length")
    train.add_argument("--passage-length", type=int, default=128, help="Lp, padded passage length")
    train.add_argument(
        "--train-steps", type=int, default=5, help="timed steps per side (the fastest is kept)"
    )
    train.add_argument("--teacher", action="store_true", help="random teacher scores (m3_kd_loss)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.encode_side:
        return run_encode_side(args)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.devices()[0].device_kind}"
    )
    print(f"machine: {machine}; load average {os.getloadavg()[0]:.1f} before the run")
    results = {"geometry": args.geometry, "machine": machine, "load_average": os.getloadavg()[0]}
    peak = measure_matmul_peak(dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = load_tokenizer(train_tokenizer(work / "tokenizer", seed=args.seed))
        config = model_config(args, len(tokenizer))
        if args.mode in ("encode", "all"):
            results["encode"] = run_encode(args, work, config, tokenizer, peak)
        if args.mode in ("train", "all"):
            params = random_params(config, args.seed)
            results["train"] = run_train(args, config, params, tokenizer, peak)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
