"""One entry point for the benchmarks: `--mode NAME` runs tools/benchmark_NAME.py with the rest of
the command line.

    python tools/benchmark.py --mode compile                 # train-step compile seconds per bucket
    python tools/benchmark.py --mode train --geometry tiny   # train step against PyTorch
    python tools/benchmark.py --mode encode --geometry tiny  # encode against FlagEmbedding
    python tools/benchmark.py --mode stage2_memory           # stage-2 dense loss memory per device
    python tools/benchmark.py --mode compile --help          # a mode's own options
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

MODES = ("compile", "data", "encode", "rerank", "stage2_memory", "train")


def main() -> None:
    args = sys.argv[1:]
    mode = None
    if "--mode" in args:
        index = args.index("--mode")
        mode = args[index + 1] if index + 1 < len(args) else None
        args = args[:index] + args[index + 2 :]
    elif any(a.startswith("--mode=") for a in args):
        mode = next(a for a in args if a.startswith("--mode=")).split("=", 1)[1]
        args = [a for a in args if not a.startswith("--mode=")]
    if mode not in MODES:
        sys.exit(f"error: --mode {mode}: expected one of {', '.join(MODES)}\n{__doc__}")
    script = Path(__file__).with_name(f"benchmark_{mode}.py")
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
