"""What the loop reports and listens to: metric lines (stdout, metrics.jsonl, TensorBoard),
throughput and MFU over a logging window, and stop signals agreed across processes."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from m3_jax import flops
from m3_jax.config import ModelConfig
from m3_jax.run_dir import BEST_INFO, TENSORBOARD_DIR, save_model_dir


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard (when tensorboardX is installed)."""

    def __init__(self, path: Path):
        self.jsonl = path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / TENSORBOARD_DIR))
        except ImportError:
            self.tensorboard = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class TrainingStopped(Exception):
    """Training stopped on a signal after saving step `step`; rerunning resumes from there."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after saving step {step}")
        self.signum, self.step = signum, step


class StopSignal:
    """Records SIGTERM/SIGINT so the loop can save a checkpoint before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, _frame):
        self.received = signum

    def agreed(self) -> bool:
        """Whether any process got a signal; every process gets the same answer, so all of them
        join the same final checkpoint."""
        if jax.process_count() == 1:
            return self.received is not None
        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        self.received = self.received or int(np.max(flags)) or None
        return self.received is not None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def summarize_window(
    window: list[dict], elapsed: float, model_config: ModelConfig, peak: float
) -> dict[str, float]:
    """Mean loss parts and head health over the window plus lr, grad norm, throughput and MFU;
    each step's "shape" is its `BatchShape`."""
    keys = [k for k in window[-1] if k.startswith(("loss/", "health/"))]
    out = {k: float(np.mean([w[k] for w in window])) for k in keys}
    out["lr"] = float(window[-1]["lr"])
    out["grad_norm"] = float(window[-1]["grad_norm"])
    tokens = sum(float(w["tokens"]) for w in window)
    examples = sum(w["shape"][0] for w in window)
    padded: dict[int, int] = {}
    for w in window:
        batch, q_len, p_len, group_size = w["shape"][:4]
        padded[q_len] = padded.get(q_len, 0) + batch * q_len
        padded[p_len] = padded.get(p_len, 0) + batch * group_size * p_len
    step_flops = flops.train_flops(model_config, padded, remat=model_config.remat)
    out["tokens_per_s"] = tokens / elapsed
    out["examples_per_s"] = examples / elapsed
    out["mfu"] = flops.mfu(step_flops, elapsed, peak)
    return out


class BestParams:
    """Keeps the params of the best evaluation so far as a model directory (`out`, with
    best.json naming the step and metrics), replaced whenever an evaluation improves on it.

    Multi-process runs call `offer` on every process with the same metrics: the save is
    collective and process 0 moves the files.
    """

    def __init__(self, out: Path, metric: str, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"eval.mode must be 'max' or 'min', got {mode!r}")
        self.out, self.metric, self.mode = out, metric, mode
        self.step: int | None = None
        self.value: float | None = None
        if (out / BEST_INFO).is_file():  # a resumed run keeps competing with its earlier best
            info = json.loads((out / BEST_INFO).read_text())
            self.step, self.value = info["step"], info["metrics"][metric]

    def improves(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def offer(
        self,
        step: int,
        metrics: dict[str, float],
        config: ModelConfig,
        params: Any,
        tokenizer_dir: str | Path,
    ) -> bool:
        """Saves `params` as the new best if `metrics[self.metric]` improves; True if it did."""
        if self.metric not in metrics:
            raise ValueError(
                f"eval.metric {self.metric!r} is not among the evaluation's metrics "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        if not self.improves(value):
            return False
        lead = jax.process_index() == 0
        staging = self.out.with_name(self.out.name + ".new")
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"best params at step {step}")
        save_model_dir(staging, config.replace(param_dtype="float32"), params, tokenizer_dir)
        if lead:
            info = {"step": step, "metric": self.metric, "metrics": metrics}
            (staging / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(self.out, ignore_errors=True)
            staging.rename(self.out)
        self.step, self.value = step, value
        return True
