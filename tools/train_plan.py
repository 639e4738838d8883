"""What a training run costs before it starts: per-device memory and FLOPs of one train step.

    python tools/train_plan.py --geometry bge-m3 --mesh 1,4,1 --mesh 1,16,1      # memory only
    python tools/train_plan.py --geometry base --flops --queries 4 --passage-length 256
    python tools/train_plan.py --geometry bge-m3 --flops --time 10 --dtype bfloat16 --attention cudnn

Memory: params + AdamW state per device for each `--mesh data,fsdp,tensor` (any size: computed
from the shapes and the sharding rules, no devices needed). `--flops` compiles one train step on
this machine's devices (fsdp over all of them) and compares XLA's FLOP count with the analytic
count of m3_jax.flops; `--time N` runs N steps on random data and reports step time and MFU
against a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from bench_common import GEOMETRIES

from m3_jax import flops, sharding
from m3_jax.config import LossConfig, OptimConfig
from m3_jax.data.plan import BatchShape
from m3_jax.model import abstract_params, graphdef
from m3_jax.training import sharded
from m3_jax.training.optim import make_optimizer
from m3_jax.training.state import abstract_state
from m3_jax.training.step import StepConfig

GIB = 2**30


def memory_rows(config, tx, meshes: list[tuple[int, int, int]]) -> list[dict]:
    params = abstract_params(config.replace(param_dtype="float32"))
    state = abstract_state(params, tx)
    rows = []
    for shape in meshes:
        mesh_shape = dict(zip(sharding.MESH_AXES, shape, strict=True))
        param_specs = sharding.param_specs(config, sharding.FSDP_RULES, mesh_shape)
        opt_specs = sharding.opt_state_shardings(
            tx, state.opt_state, param_specs, jax.sharding.PartitionSpec()
        )
        p = sharding.bytes_per_device(params, param_specs, mesh_shape)
        o = sharding.bytes_per_device(state.opt_state, opt_specs, mesh_shape)
        rows.append({"mesh": shape, "devices": int(np.prod(shape)), "params": p, "opt_state": o})
    return rows


def random_batch(rng, queries, group, q_len, p_len, vocab) -> dict[str, np.ndarray]:
    def texts(num, length):
        lengths = rng.integers(length // 2, length + 1, num)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask, rng.integers(5, vocab, (num, length)), 1).astype(np.int32)
        ids[:, 0] = 0
        return ids, mask

    q_ids, q_mask = texts(queries, q_len)
    p_ids, p_mask = texts(queries * group, p_len)
    return dict(query_ids=q_ids, query_mask=q_mask, passage_ids=p_ids, passage_mask=p_mask)


def step_rows(args, config, tx) -> dict:
    mesh = sharding.make_mesh(1, -1, 1)
    shards = sharding.data_parallel_size(mesh)
    loss = LossConfig(num_shards=shards)
    step_config = StepConfig(loss, args.sub_batch_size, dropout=False, data_shards=shards)
    layout = sharded.state_shardings(config, tx, mesh, sharding.FSDP_RULES)
    step_fn = sharded.jit_train_step(graphdef(config), tx, step_config, layout, mesh)
    shape = BatchShape(args.queries, args.query_length, args.passage_length, args.group_size, True)
    batch_spec = sharded.batch_spec(shape, with_teacher=False)
    state_spec = sharded.with_shardings(
        abstract_state(abstract_params(config.replace(param_dtype="float32")), tx), layout
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step_fn.lower(state_spec, batch_spec, sharded.LR_SPEC).compile()
    out = {"compile_seconds": time.perf_counter() - start}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tokens = {
        args.query_length: args.queries * args.query_length,
        args.passage_length: args.queries * args.group_size * args.passage_length,
    }
    out["xla_flops"] = float(cost.get("flops", 0.0)) * jax.device_count()
    out["analytic_flops"] = flops.train_flops(config, tokens, remat=config.remat)
    if args.time:
        params = sharded.fresh_params(config, 0, layout.params)
        state = sharded.initial_state(params, tx, 0, layout)
        rng = np.random.default_rng(0)
        host = random_batch(rng, *shape[:1], args.group_size, *shape[1:3], config.vocab_size)
        batch = sharding.put_global(host, sharding.batch_sharding(mesh))
        lr = np.float32(1e-5)
        state, metrics = compiled(state, batch, lr)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.time):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, lr)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        peak = flops.measure_matmul_peak(4096, dtype=config.dtype) * jax.device_count()
        out.update(
            step_seconds=float(np.median(times)),
            loss=float(metrics["loss/loss"]),
            peak_flops_per_s=peak,
            mfu=flops.mfu(out["analytic_flops"], float(np.median(times)), peak),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="bge-m3")
    parser.add_argument("--mesh", action="append", default=None, help="data,fsdp,tensor")
    parser.add_argument("--flops", action="store_true", help="compile a step here, count FLOPs")
    parser.add_argument("--time", type=int, default=0, help="also time this many steps")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--attention", default="xla", help="attention_impl")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--scan-layers", action="store_true", help="lax.scan over the layers")
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--sub-batch-size", type=int, default=None, help="rows per device per call")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = GEOMETRIES[args.geometry](
        dtype=args.dtype,
        attention_impl=args.attention,
        remat=args.remat,
        scan_layers=args.scan_layers,
    )
    tx, _ = make_optimizer(OptimConfig(), 1000, abstract_params(config))
    meshes = [tuple(int(x) for x in m.split(",")) for m in (args.mesh or ["1,4,1", "1,16,1"])]
    result: dict = {"geometry": args.geometry, "memory": memory_rows(config, tx, meshes)}
    print(f"{args.geometry}: params + AdamW state per device (fp32), FSDP rules")
    print("mesh (data,fsdp,tensor) | devices | params GiB | opt state GiB | total GiB")
    for r in result["memory"]:
        total = (r["params"] + r["opt_state"]) / GIB
        print(
            f"{r['mesh']} | {r['devices']} | {r['params'] / GIB:.3f} | "
            f"{r['opt_state'] / GIB:.3f} | {total:.3f}"
        )
    if args.flops or args.time:
        s = step_rows(args, config, tx)
        result["step"] = s
        print(
            f"one train step, B={args.queries} G={args.group_size} Lq={args.query_length} "
            f"Lp={args.passage_length}, {config.dtype}, {args.attention}, "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        )
        print(
            f"compile {s['compile_seconds']:.1f} s; FLOPs: XLA {s['xla_flops']:.4g}, analytic "
            f"{s['analytic_flops']:.4g}, ratio {s['xla_flops'] / s['analytic_flops']:.3f}"
        )
        if config.scan_layers:
            print("(XLA counts a scanned loop body once: the ratio covers one layer of the stack)")
        if "step_seconds" in s:
            print(
                f"step {s['step_seconds'] * 1e3:.1f} ms, loss {s['loss']:.4f}, matmul peak "
                f"{s['peak_flops_per_s'] / 1e12:.1f} TFLOP/s, MFU {s['mfu']:.1%}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
