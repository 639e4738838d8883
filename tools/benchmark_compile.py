"""Compile time of the train step: seconds (trace, lower, compile) per length bucket, per
geometry, with and without scan.

    python tools/benchmark.py --mode compile
    python tools/benchmark_compile.py --geometries tiny,bge-m3 --passage-lengths 256,1024

Each bucket's program is the training loop's own: `sharded.jit_train_step` of the unified M3 loss
with self-distillation and AdamW, lowered on abstract inputs and compiled by
`m3_jax.training.programs.BucketPrograms` (nothing is allocated, so the full geometry at 8192
tokens compiles on any host). One bucket per passage length (the tpu_v4 recipe's seven by
default), B queries of Lq tokens with G passages each. For every geometry the buckets compile
first one at a time (seconds per bucket), then on one thread per core (the wall time until the
last is ready; one XLA compile already keeps ~1.5 cores busy, so the training loop's default is
one thread per two cores). No persistent cache is used.
`--breakdown` adds, at the first bucket, the step without dropout (each dropout site draws its
mask with threefry, which XLA's CPU backend compiles as a loop of several kernels) and the
compile seconds of the step's parts: the encoder forward, the loss forward, the loss with its
gradient (both without dropout), and the optimizer update.

Prints a table; --json writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_common import GEOMETRIES, print_table

from m3_jax import sharding
from m3_jax.bucketing import TRAINING_LENGTHS
from m3_jax.config import LossConfig, OptimConfig
from m3_jax.data.plan import BatchShape
from m3_jax.model import abstract_params, graphdef
from m3_jax.training import sharded
from m3_jax.training.optim import apply_update, make_optimizer
from m3_jax.training.programs import BucketPrograms
from m3_jax.training.state import abstract_state
from m3_jax.training.step import StepConfig, encode, loss_fn

NO_TEACHER = functools.partial(sharded.batch_spec, with_teacher=False)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One geometry's train step on a one-device mesh, and the abstract state it takes."""

    config: object
    tx: object
    step_config: StepConfig
    step_fn: object
    state_spec: object
    mesh: object


def setup(geometry: str, scan: bool, args) -> Setup:
    longest = max(args.passage_lengths)
    config = GEOMETRIES[geometry](
        scan_layers=scan,
        remat=args.remat,
        attention_impl=args.attention,
        max_position_embeddings=max(longest + 2, 514),
    )
    params = abstract_params(config)
    tx, _ = make_optimizer(OptimConfig(), 1000, params)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = sharded.state_shardings(config, tx, mesh, sharding.FSDP_RULES)
    step_config = StepConfig(LossConfig(num_shards=1), None, dropout=True, data_shards=1)
    step_fn = sharded.jit_train_step(graphdef(config), tx, step_config, layout, mesh)
    state_spec = sharded.with_shardings(abstract_state(params, tx), layout)
    return Setup(config, tx, step_config, step_fn, state_spec, mesh)


def bucket_shapes(args) -> list[BatchShape]:
    return [
        BatchShape(args.queries, args.query_length, length, args.group_size, True)
        for length in args.passage_lengths
    ]


def compile_buckets(s: Setup, shapes: list[BatchShape], workers: int) -> tuple[dict, float]:
    """({bucket label: seconds}, wall seconds) of compiling every bucket on `workers` threads."""
    start = time.perf_counter()
    programs = BucketPrograms({True: s.step_fn}, s.state_spec, shapes, NO_TEACHER, s.mesh, workers)
    seconds = programs.wait_all()
    return seconds, time.perf_counter() - start


def compile_seconds(fn, *args) -> float:
    """Seconds to trace, lower and compile `fn` (as the per-bucket figures count them)."""
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def breakdown(s: Setup, shape: BatchShape) -> dict[str, float]:
    """Compile seconds of the train step's parts at one bucket shape."""
    params = abstract_params(s.config)
    batch = sharded.batch_spec(shape, False)
    model = graphdef(s.config)
    step = jnp.int32(0)

    def loss(p, b):
        return loss_fn(p, model, b, step, None, s.step_config)[0]

    def encoder(p, b):
        return encode(model, p, b["passage_ids"], b["passage_mask"], None, None)

    def update(g, o, p):
        return apply_update(s.tx, g, o, p, jnp.float32(1e-5))

    no_dropout = dataclasses.replace(s.step_config, dropout=False)
    layout = sharded.state_shardings(s.config, s.tx, s.mesh, sharding.FSDP_RULES)
    step_fn = sharded.jit_train_step(model, s.tx, no_dropout, layout, s.mesh)
    programs = BucketPrograms({True: step_fn}, s.state_spec, [shape], NO_TEACHER, s.mesh, 1)
    return {
        "train step without dropout": programs.wait_all()[shape.label],
        "encoder forward (passages)": compile_seconds(encoder, params, batch),
        "loss forward": compile_seconds(loss, params, batch),
        "loss + gradient": compile_seconds(jax.value_and_grad(loss), params, batch),
        "optimizer update": compile_seconds(update, params, s.state_spec.opt_state, params),
    }


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometries", default="tiny,base,bge-m3")
    parser.add_argument("--scan", default="off,on", help="off, on, or off,on")
    parser.add_argument(
        "--passage-lengths", default=",".join(map(str, TRAINING_LENGTHS)), help="one bucket each"
    )
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--attention", default="chunked", help="attention_impl")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="compile the step's parts too")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.geometries = [g.strip() for g in args.geometries.split(",") if g.strip()]
    unknown = sorted(set(args.geometries) - set(GEOMETRIES))
    if unknown:
        parser.error(f"--geometries {unknown}: expected some of {sorted(GEOMETRIES)}")
    args.scan = [{"off": False, "on": True}[x.strip()] for x in args.scan.split(",")]
    args.passage_lengths = [int(x) for x in args.passage_lengths.split(",")]
    return args


def main() -> None:
    args = parse_args()
    jax.config.update("jax_compilation_cache_dir", None)  # time real compiles
    shapes = bucket_shapes(args)
    print(
        f"machine: {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"buckets B={args.queries} G={args.group_size} Lq={args.query_length}, "
        f"{args.attention} attention{', remat' if args.remat else ''}"
    )
    results = []
    for geometry in args.geometries:
        for scan in args.scan:
            # A fresh step function each time: jit would hand back the programs it already built.
            s = setup(geometry, scan, args)
            sequential, _ = compile_buckets(s, shapes, workers=1)
            _, wall = compile_buckets(
                setup(geometry, scan, args), shapes, workers=os.cpu_count() or 1
            )
            row = {
                "geometry": geometry,
                "scan_layers": scan,
                "seconds": sequential,
                "sum": sum(sequential.values()),
                "parallel_wall": wall,
                "parallel_threads": min(len(shapes), os.cpu_count() or 1),
            }
            if args.breakdown:
                row["breakdown"] = breakdown(s, shapes[0])
            results.append(row)
            print(f"{geometry} scan={'on' if scan else 'off'}: {row['sum']:.1f} s one at a time")
    columns = [f"{r['geometry']}{' scan' if r['scan_layers'] else ''}" for r in results]
    rows = [
        [f"Lp {shape.passage_len}"] + [f"{r['seconds'][shape.label]:.1f}" for r in results]
        for shape in shapes
    ]
    rows.append(["sum, one at a time"] + [f"{r['sum']:.1f}" for r in results])
    rows.append(
        [f"wall, {results[0]['parallel_threads']} at once"]
        + [f"{r['parallel_wall']:.1f}" for r in results]
    )
    if args.breakdown:
        for part in results[0]["breakdown"]:
            rows.append(
                [f"{part} (Lp {shapes[0].passage_len})"]
                + [f"{r['breakdown'][part]:.1f}" for r in results]
            )
    print_table(
        "train-step compile seconds per bucket",
        ["bucket", *columns],
        rows,
        ["fp32 params, unified loss with self-distillation, AdamW; compiled on abstract inputs"],
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
