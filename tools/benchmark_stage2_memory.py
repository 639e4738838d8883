"""Per-device memory of the stage-2 dense loss at the paper's batches: XLA's temporary bytes for
`m3_jax.losses.blocked_dense_loss` and its gradient, against the whole [B, B*G] score matrix.

    python tools/benchmark.py --mode stage2_memory
    python tools/benchmark_stage2_memory.py --batches 67200,134400 --row-blocks 1024,0 --dim 32

Stage 2 (unsupervised contrastive pre-training) takes InfoNCE over global batches of 67,200 pairs
(0-500 tokens) down to 9,984 (7k-8192 tokens), the defaults here. The loss and its gradient in the
embeddings compile on abstract inputs (nothing is allocated) on a mesh of `--devices` CPU devices
with the batch split over them, as the training step runs it; `temp` is XLA's
`temp_size_in_bytes` per device, which holds the score blocks, the all-gathered passages and
their gradient. Row blocks 0 = each device's rows in one block (its whole [B/N, B*G] slice).
XLA_FLAGS gets 8 host devices unless it names a count already.
"""

from __future__ import annotations

import argparse
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_common import print_table  # noqa: E402

from m3_jax import losses, sharding  # noqa: E402

# The paper's stage-2 total batch per length bucket (Table 9): 700 ... 104 per GPU x 96 GPUs.
STAGE2_BATCHES = (67200, 54720, 37248, 27648, 21504, 17280, 15072, 12288, 9984)


def temp_bytes(mesh: jax.sharding.Mesh, batch: int, group: int, dim: int, row_block: int) -> int:
    """XLA's temporary bytes per device of the loss and its gradient in q and p."""
    data = sharding.batch_sharding(mesh)
    q = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=data)
    p = jax.ShapeDtypeStruct((batch * group, dim), jnp.float32, sharding=data)

    def loss(q, p):
        return losses.blocked_dense_loss(q, p, group, 0.02, row_block)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(q, p).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default=",".join(map(str, STAGE2_BATCHES)))
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the mesh")
    parser.add_argument("--row-blocks", default="1024,0", help="loss.dense_row_block values")
    parser.add_argument("--dim", type=int, default=1024, help="embedding size (bge-m3: 1024)")
    parser.add_argument("--group-size", type=int, default=1)
    args = parser.parse_args()

    devices = jax.devices("cpu")
    if args.devices > len(devices):
        parser.error(f"--devices {args.devices}: XLA_FLAGS gives {len(devices)} CPU devices")
    mesh = sharding.make_mesh(1, -1, 1, devices=devices[: args.devices])
    row_blocks = args.row_blocks.split(",")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        whole = batch * batch * args.group_size * 4
        per_device = batch // args.devices
        # Row-block settings that give the same blocks on this batch are measured once.
        settings = {losses.dense_row_blocks(per_device, int(r)): int(r) for r in row_blocks}
        for (_, block), row_block in sorted(settings.items(), reverse=True):
            temp = temp_bytes(mesh, batch, args.group_size, args.dim, row_block)
            rows.append(
                [
                    f"{batch:,}",
                    str(args.devices),
                    f"{per_device:,}",
                    f"{block:,}",
                    gib(temp),
                    gib(whole),
                    f"{temp / whole:.4f}",
                ]
            )
    print_table(
        f"stage-2 dense loss + gradient, fp32, G={args.group_size}, embedding dim {args.dim}",
        ["global batch", "devices", "per device", "block rows", "temp/device", "whole", "ratio"],
        rows,
        [
            "whole: the [B, B*G] fp32 score matrix; ratio: temp per device / whole",
            "block rows: rows of each [rows, B*G] block, the fewest equal blocks of at most "
            "loss.dense_row_block rows of a device's",
        ],
    )


if __name__ == "__main__":
    main()
