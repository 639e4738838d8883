"""Encode throughput of m3_jax against PyTorch and FlagEmbedding on the same weights and texts.

    python tools/benchmark_encode.py --geometry tiny
    python tools/benchmark_encode.py --geometry base --flag-embedding-python /tmp/fe/bin/python
    python tools/benchmark_encode.py --geometry bge-m3 --max-length 8192 --num-texts 64
    python tools/benchmark_encode.py --geometry bge-m3 --dtype bfloat16 --attention cudnn \
        --sides m3_jax                                         # a GPU: bf16 MFU, cuDNN attention

All sides start from identical random weights (m3_jax.tiny.random_params) in the geometry asked for
and compute dense + sparse + colbert outputs of the same texts, whose token counts are drawn like a
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

Prints a table; --json writes the results.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from bench_common import base_parser, model_config, print_table, start_run, texts_of_lengths
from torch_m3 import torch_encode, torch_m3

from m3_jax.bucketing import plan_batches
from m3_jax.convert.to_torch import export_torch_dir
from m3_jax.flops import forward_flops_per_token, mfu
from m3_jax.inference import M3Embedder
from m3_jax.model import model_from_params
from m3_jax.tiny import random_params, train_tokenizer
from m3_jax.tokenization import load_tokenizer


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
    first_call = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return output, first_call, best


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


# The sides -------------------------------------------------------------------------------------
# Each implementation encodes in a process of its own, so that its peak memory is its own and
# FlagEmbedding can run under another interpreter (it pins transformers 4.x). The parent writes
# the tokenizer and texts.json into a work directory and runs this script again with --encode-side
# and --work (tools/flag_embedding_encode.py for FlagEmbedding); each side writes result.json and
# dense.npy into work/<side>, and the parent compares the dense vectors against the reference's.


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
    # The first dispatch of a shape compiles it, so compile order is first-seen order.
    shapes = list(dict.fromkeys((b.rows, b.length) for b in plan))
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
    config = model_config(args, len(tokenizer), args.max_length)
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


def side_commands(args, work: Path, config, tokenizer) -> dict[str, list[str]]:
    """{side: the command that runs it}, in --sides order, FlagEmbedding left out if absent."""
    child_args = [
        f"--geometry={args.geometry}",
        f"--seed={args.seed}",
        f"--max-length={args.max_length}",
        f"--batch-size={args.batch_size}",
        f"--max-tokens-per-batch={args.max_tokens_per_batch}",
        f"--repeats={args.repeats}",
        f"--torch-attention={args.torch_attention}",
        f"--attention={args.attention}",
        f"--dtype={args.dtype}",
        f"--work={work}",
    ]
    commands = {}
    for side in args.sides.split(","):
        if side in ENCODERS:
            commands[side] = [sys.executable, __file__, *child_args, f"--encode-side={side}"]
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
    return commands


def run_encode(args, work: Path, config, tokenizer, peak_flops: float) -> dict:
    texts = texts_of_lengths(corpus_lengths(args.num_texts, args.max_length, args.seed), args.seed)
    (work / "texts.json").write_text(json.dumps(texts))
    lengths = token_lengths(tokenizer, texts, args.max_length)
    useful_flops = sum(n * forward_flops_per_token(config, n) for n in lengths)
    commands = side_commands(args, work, config, tokenizer)
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
    print_encode_table(args, summary)
    return summary


def print_encode_table(args, summary: dict) -> None:
    results, reference = summary["sides"], summary["reference"]
    real_tokens, peak_flops = summary["real_tokens"], summary["matmul_peak_flop_per_s"]
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
            + f"; {ours['padded_tokens']} padded tokens computed for {real_tokens} real"
        )
    notes += [
        f"max |dense - {reference}|: "
        + ", ".join(
            f"{n} {s['max_abs_dense_diff_vs_' + reference]:.1e}" for n, s in results.items()
        )
    ]
    print_table(
        f"encode, geometry={args.geometry}, {summary['num_texts']} texts, {real_tokens} real "
        f"tokens, {args.dtype}, dense+sparse+colbert",
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


def parse_args():
    parser = base_parser(__doc__)
    parser.add_argument(
        "--sides",
        default="flag_embedding,torch,m3_jax",
        help="implementations to run, the first present is the reference (ratio 1.00)",
    )
    parser.add_argument(
        "--flag-embedding-python",
        default=None,
        help="an interpreter that imports FlagEmbedding (default: this one; skipped if neither)",
    )
    parser.add_argument("--num-texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=65536,
        help="m3_jax bucket budget (rows x length)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed encode runs per side after the warm-up"
    )
    parser.add_argument("--encode-side", choices=sorted(ENCODERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.encode_side:
        return run_encode_side(args)
    results, peak = start_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = load_tokenizer(train_tokenizer(work / "tokenizer", seed=args.seed))
        config = model_config(args, len(tokenizer), args.max_length)
        results["encode"] = run_encode(args, work, config, tokenizer, peak)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
