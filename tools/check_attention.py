"""Numerics of the fused attention kernels against "xla" on this machine's accelerator.

    python tools/check_attention.py                      # cudnn on a GPU, splash on a TPU
    python tools/check_attention.py --impl splash --interpret   # the splash kernel on any backend

For BGE-M3's attention shape (16 heads of 64) and right-padded rows, compares the kernel's outputs
and its gradients (of a random projection of the real rows) with the "xla" implementation at the
same dtype and with float32 "xla", over the real query rows only, and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.model.attention import (
    cudnn_attention,
    splash_attention,
    unsupported_reason,
    xla_attention,
)


def inputs(seed: int, batch: int, length: int, heads: int, head_dim: int, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, probe = (
        rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32) for _ in range(4)
    )
    lengths = rng.integers(length // 4, length + 1, batch)
    lengths[0] = length
    key_mask = np.arange(length)[None, :] < lengths[:, None]
    cast = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return cast, jnp.asarray(key_mask), jnp.asarray(probe * key_mask[..., None, None])


def outputs_and_grads(fn, qkv, key_mask, probe):
    def objective(q, k, v):
        out = fn(q, k, v, key_mask)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    grad = jax.jit(jax.grad(objective, argnums=(0, 1, 2), has_aux=True))
    (dq, dk, dv), out = grad(*qkv)
    jax.block_until_ready(out)
    start = time.perf_counter()
    jax.block_until_ready(grad(*qkv))
    seconds = time.perf_counter() - start
    return [np.asarray(x, np.float32) for x in (out, dq, dk, dv)], seconds


def relative_error(got: np.ndarray, want: np.ndarray, rows: np.ndarray) -> float:
    diff = np.abs(got[rows] - want[rows]).max()
    return float(diff / max(np.abs(want[rows]).max(), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = "splash" if jax.default_backend() == "tpu" else "cudnn"
    parser.add_argument("--impl", choices=("cudnn", "splash"), default=default)
    parser.add_argument("--interpret", action="store_true", help="splash in interpret mode")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    if args.impl == "splash" and args.interpret:
        kernel = functools.partial(splash_attention, interpret=True)
    else:
        probe = jnp.zeros((1, 128, 1, 8), dtype)
        reason = unsupported_reason(args.impl, probe, dropout_active=False)
        if reason is not None:
            raise SystemExit(f"cannot check {args.impl}: {reason}")
        kernel = cudnn_attention if args.impl == "cudnn" else splash_attention
    print(f"{args.impl} vs xla on {jax.devices()[0].device_kind}, {dtype.name}")
    header = [
        "length",
        "rel err vs xla (out, dq, dk, dv)",
        "vs xla fp32 (out)",
        "ms fused",
        "ms xla",
    ]
    print(" | ".join(header))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        qkv, key_mask, probe = inputs(length, args.batch, length, args.heads, args.head_dim, dtype)
        real = np.asarray(key_mask)
        fused, fused_s = outputs_and_grads(kernel, qkv, key_mask, probe)
        xla, xla_s = outputs_and_grads(xla_attention, qkv, key_mask, probe)
        exact, _ = outputs_and_grads(
            xla_attention, [x.astype(jnp.float32) for x in qkv], key_mask, probe
        )
        errors = [relative_error(a, b, real) for a, b in zip(fused, xla, strict=True)]
        row = {
            "length": length,
            "relative_error_vs_xla": errors,
            "relative_error_vs_fp32": relative_error(fused[0], exact[0], real),
            "xla_relative_error_vs_fp32": relative_error(xla[0], exact[0], real),
            "fused_ms": fused_s * 1e3,
            "xla_ms": xla_s * 1e3,
        }
        rows.append(row)
        print(
            f"{length} | {', '.join(f'{e:.2e}' for e in errors)} | "
            f"{row['relative_error_vs_fp32']:.2e} (xla {row['xla_relative_error_vs_fp32']:.2e}) | "
            f"{row['fused_ms']:.2f} | {row['xla_ms']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"impl": args.impl, "dtype": dtype.name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
