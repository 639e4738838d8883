"""The training loop, read top to bottom: data, model, optimizer, resume, compile, train, export.

Everything that shapes numerics lives in the pure step (step.py); this file does the I/O:
checkpoints (orbax, async, keep-N, resume from the latest), signals (SIGTERM/SIGINT save a
checkpoint before exiting), metrics (stdout, metrics.jsonl, TensorBoard) and the final export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from m3_jax import checkpoint, flops, sharding
from m3_jax import config as model_presets
from m3_jax.config import ModelConfig
from m3_jax.convert.sources import write_run_info
from m3_jax.data.buckets import BatchSizing
from m3_jax.data.pipeline import LoaderPosition, LoaderSettings, TrainLoader, to_global_batch
from m3_jax.data.records import read_records
from m3_jax.losses import LossConfig
from m3_jax.model import M3Model
from m3_jax.model_dir import (
    Params,
    abstract_params,
    is_model_dir,
    load_model_dir,
    save_model_dir,
)
from m3_jax.tokenization import check_tokenizer_matches, load_tokenizer
from m3_jax.training import sharded
from m3_jax.training.monitor import (
    METRICS_FILE,
    BestParams,
    MetricsWriter,
    StopSignal,
    summarize_window,
)
from m3_jax.training.optim import OptimConfig, make_optimizer
from m3_jax.training.state import abstract_state
from m3_jax.training.step import StepConfig

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"

EvalFn = Callable[[ModelConfig, Params, Path], dict[str, float]]  # (config, params, tokenizer)


class NonFiniteLossError(FloatingPointError):
    pass


# Model -------------------------------------------------------------------------------------------


def load_initial_model(cfg: ConfigDict) -> tuple[ModelConfig, Params | None, Path]:
    """(model config, float32 host params or None for a fresh init, tokenizer dir) from
    `model.init_from`, or from `model.preset` and the tokenizer's vocabulary."""
    m = cfg.model
    overrides = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl,
        attention_chunk_size=m.attention_chunk_size,
        remat=m.remat,
        scan_layers=m.scan_layers,
    )
    if m.attention_probs_dropout_prob >= 0:
        overrides["attention_probs_dropout_prob"] = m.attention_probs_dropout_prob
    if m.init_from:
        if is_model_dir(m.init_from):
            config, params = load_model_dir(m.init_from, **overrides)
            source = Path(m.init_from)
        else:
            from m3_jax.convert.from_torch import load_bge_m3

            config, params, source = load_bge_m3(
                m.init_from, fresh_heads=m.fresh_heads, **overrides
            )
        return config, params, Path(m.tokenizer or source)
    if not m.tokenizer:
        raise ValueError(
            "model.tokenizer must name a tokenizer directory when model.init_from is unset"
        )
    vocab_size = len(load_tokenizer(m.tokenizer))
    preset = getattr(model_presets, m.preset)
    return preset(vocab_size=vocab_size, **dict(m.geometry), **overrides), None, Path(m.tokenizer)


def mesh_from_config(cfg: ConfigDict) -> Mesh:
    c = cfg.mesh
    return sharding.make_mesh(c.data, c.fsdp, c.tensor, dcn_data=c.dcn_data, dcn_fsdp=c.dcn_fsdp)


def data_parallel_if_negative(value: int, mesh: Mesh) -> int:
    """Config sizes of -1 mean "the number of data-parallel shards of the mesh"."""
    return sharding.data_parallel_size(mesh) if value < 0 else value


# Data --------------------------------------------------------------------------------------------


def loader_settings(cfg: ConfigDict, mesh: Mesh) -> LoaderSettings:
    d = cfg.data
    sizing = BatchSizing(
        token_budget=d.token_budget if d.batch_size_preset is None else None,
        preset=d.batch_size_preset,
        max_batch_size=d.max_batch_size,
        batch_multiple=data_parallel_if_negative(d.batch_multiple, mesh),
    )
    return LoaderSettings(
        sizing=sizing,
        seed=cfg.seed,
        group_size=d.group_size,
        query_max_len=d.query_max_len,
        passage_max_len=d.passage_max_len,
        bucket_lengths=tuple(d.passage_buckets),
        query_instruction=d.query_instruction,
        passage_instruction=d.passage_instruction,
        with_teacher_scores=d.knowledge_distillation,
        sort_negatives_by_teacher=d.sort_negatives_by_teacher,
    )


# The run -----------------------------------------------------------------------------------------


def train(cfg: ConfigDict, eval_fn: EvalFn | None = None) -> dict:
    """Trains per `cfg` (configs/base.py documents every field); returns a summary dict.

    eval_fn(model_config, params, tokenizer_dir) -> {metric: value} runs before training
    (`eval.before_training`), every `eval.every` steps and at the end, together with the dev loss
    of `eval.loss_files`; the params with the best `eval.metric` are kept in `best/`.
    Multi-process runs call this on every process (after `jax.distributed.initialize`); only
    process 0 writes metrics and the summary.
    """
    workdir = Path(cfg.workdir)
    lead = jax.process_index() == 0
    show = cfg.train.progress and lead
    if cfg.train.compilation_cache_dir:
        cache_dir = os.path.expanduser(cfg.train.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    # Data first: malformed files fail here, before anything is written.
    records = read_records(cfg.data.train_files)
    dev_records = read_records(cfg.eval.loss_files) if cfg.eval.loss_files else None
    model_config, host_params, tokenizer_dir = load_initial_model(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_matches(tokenizer, model_config, tokenizer_dir)
    mesh = mesh_from_config(cfg)
    log.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    settings = loader_settings(cfg, mesh)
    loader_args = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        progress=None if show else False,  # None: a bar while measuring > 10k texts
    )
    loader = TrainLoader(records, tokenizer, settings, **loader_args)
    dev_loader = (
        None
        if dev_records is None
        else TrainLoader(dev_records, tokenizer, settings, **loader_args)
    )
    total_steps = cfg.train.num_steps or cfg.train.num_epochs * loader.steps_per_epoch
    if loader.num_unused_examples:
        log.warning(
            "%d examples fit no bucket that fills a global batch and are not used",
            loader.num_unused_examples,
        )
    log.info(
        "%d records, %d batches per epoch over %d buckets, %d steps",
        len(records),
        loader.steps_per_epoch,
        len(loader.buckets),
        total_steps,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        write_run_info(workdir, model_config, str(tokenizer_dir))

    # Optimizer, step and the sharded state.
    abstract = abstract_params(model_config.replace(param_dtype="float32"))
    tx, schedule = make_optimizer(OptimConfig(**cfg.optim), total_steps, abstract)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: M3Model(model_config, rngs=nnx.Rngs(0))))
    loss_values = dict(cfg.loss, num_shards=data_parallel_if_negative(cfg.loss.num_shards, mesh))
    loss_config = LossConfig(group_size=cfg.data.group_size, **loss_values)
    step_config = StepConfig(
        loss_config,
        cfg.train.sub_batch_size,
        cfg.train.dropout,
        data_shards=sharding.data_parallel_size(mesh),
    )
    layout = sharded.state_shardings(model_config, tx, mesh, tuple(cfg.mesh.rules))

    # Resume from the newest checkpoint, if any, onto this run's mesh.
    manager = checkpoint.make_manager(
        workdir / CHECKPOINT_DIR,
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
    )
    start_position = LoaderPosition()
    target = sharded.with_shardings(abstract_state(abstract, tx), layout)
    restored = checkpoint.restore_latest(manager, target)
    if restored is not None:
        state, saved = restored
        check_same_plan(saved, loader, mesh)
        start_position = LoaderPosition.from_json(saved)
        log.info("resumed from step %d at loader position %s", int(state.step), start_position)
    elif host_params is None:
        params = sharded.fresh_params(model_config, cfg.seed, layout.params)
        state = sharded.initial_state(params, tx, cfg.seed, layout)
    else:
        params = sharding.put_global(host_params, layout.params)
        state = sharded.initial_state(params, tx, cfg.seed, layout)
    del host_params

    # Compile every bucket up front.
    with_teacher = cfg.data.knowledge_distillation
    state_spec = jax.eval_shape(lambda s: s, state)
    step_fn = sharded.jit_train_step(graphdef, tx, step_config, layout, mesh)
    compiled, compile_seconds = {}, {}
    with jax.set_mesh(mesh):
        for shape in tqdm(loader.bucket_shapes(), desc="compile", disable=not show):
            start = time.perf_counter()
            spec = sharded.batch_spec(shape, cfg.data.group_size, with_teacher)
            compiled[shape] = step_fn.lower(state_spec, spec, sharded.LR_SPEC).compile()
            compile_seconds[str(shape)] = round(time.perf_counter() - start, 2)
        eval_step = sharded.jit_eval_step(graphdef, step_config, layout, mesh)
    summary: dict[str, Any] = {"compile_seconds": compile_seconds}
    log.info("compiled %d bucket programs: %s", len(compiled), compile_seconds)

    if eval_fn is not None and jax.process_count() > 1:
        # Retrieval evaluation places its corpus on this process's devices only.
        log.warning(
            "retrieval evaluation runs in single-process runs only; skipped here (the dev loss, "
            "eval.loss_files, works on any mesh; evaluate export/ with tools/evaluate.py)"
        )
        eval_fn = None
    evaluating = eval_fn is not None or dev_loader is not None

    best = BestParams(workdir / BEST_DIR, cfg.eval.metric, cfg.eval.mode) if evaluating else None
    writer = MetricsWriter(workdir / METRICS_FILE) if lead else None

    def evaluate(step: int, host_params: Params | None = None) -> dict[str, float]:
        """Dev loss and eval_fn's metrics of the current params (`host_params`, when already
        gathered), written as eval/ rows of metrics.jsonl and offered to best/."""
        metrics = {}
        if dev_loader is not None:
            with jax.set_mesh(mesh):
                metrics.update(dev_loss(eval_step, state, dev_loader, mesh))
        if eval_fn is not None:
            metrics.update(eval_fn(model_config, state.params, tokenizer_dir))
        log.info("evaluation at step %d: %s", step, metrics)
        if writer is not None:
            writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if host_params is None:
            host_params = gather(state.params)
        best.offer(step, metrics, model_config, host_params, tokenizer_dir)
        return metrics

    step = int(state.step)
    if evaluating and cfg.eval.before_training and step == 0:
        summary["eval_before"] = evaluate(0)

    peak = cfg.train.peak_flops_per_s or flops.measure_matmul_peak()
    stop = StopSignal()
    batch_layout = sharding.batch_sharding(mesh)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not show)
    window: list[dict] = []
    window_start = time.perf_counter()
    try:
        for position, host_batch in loader.iterate(start_position):
            if step >= total_steps:
                break
            shape = (
                host_batch["query_ids"].shape[0] * jax.process_count(),
                host_batch["query_ids"].shape[1],
                host_batch["passage_ids"].shape[1],
            )
            batch = to_global_batch(host_batch, batch_layout)
            state, metrics = compiled[shape](state, batch, np.float32(schedule(step)))
            metrics = jax.device_get(metrics)
            step += 1
            progress.update()
            if not math.isfinite(float(metrics["loss/loss"])):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: "
                    + ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
                    + "; the last checkpoint (written before this step) is kept"
                )
            window.append({"shape": shape, **metrics})
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = summarize_window(window, elapsed, model_config, cfg.data.group_size, peak)
                if writer is not None:
                    writer.write(step, record)
                progress.set_postfix(loss=f"{record['loss/loss']:.4f}")
                if show:
                    tqdm.write(
                        f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items())
                    )
                window, window_start = [], time.perf_counter()
            pause_start = time.perf_counter()  # evaluations and saves count in no throughput
            if evaluating and cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                evaluate(step)
            stopping = stop.agreed()
            if step % cfg.train.save_every == 0 or step == total_steps or stopping:
                checkpoint.save(manager, step, state, loader_json(position, loader, mesh))
            window_start += time.perf_counter() - pause_start
            if stopping:
                manager.wait_until_finished()
                raise SystemExit(f"stopped by signal {stop.received} after saving step {step}")
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    finally:
        progress.close()
        stop.restore()
        manager.wait_until_finished()
        manager.close()

    # Export params for M3Embedder.from_pretrained.
    params = gather(state.params)
    export = workdir / EXPORT_DIR
    if not export.exists():
        save_model_dir(export, model_config.replace(param_dtype="float32"), params, tokenizer_dir)
    summary.update(final_step=step, export=str(export))
    if evaluating:
        summary["eval_after"] = evaluate(step, params)
    if writer is not None:
        writer.close()
    if best is not None and best.step is not None:
        summary["best"] = {"step": best.step, cfg.eval.metric: best.value, "dir": str(best.out)}
    if lead:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def loader_json(position: LoaderPosition, loader: TrainLoader, mesh: Mesh) -> dict:
    """The loader position plus what it refers to (the batch plan), saved with a checkpoint."""
    return {
        **position.to_json(),
        "plan": {
            "steps_per_epoch": loader.steps_per_epoch,
            "bucket_shapes": [list(s) for s in loader.bucket_shapes()],
            "data_parallel_size": sharding.data_parallel_size(mesh),
        },
    }


def check_same_plan(saved: dict, loader: TrainLoader, mesh: Mesh) -> None:
    """A checkpoint's (epoch, step) names a batch of its own run's plan: resuming with other
    batch sizes would silently skip or repeat data, so that is an error that says what changed."""
    plan = saved.get("plan")
    if plan is None:  # checkpoints from before the plan was recorded
        return
    now = loader_json(LoaderPosition(), loader, mesh)["plan"]
    if plan["bucket_shapes"] == now["bucket_shapes"]:
        return
    hint = ""
    if plan["data_parallel_size"] != now["data_parallel_size"]:
        hint = (
            f"; the data-parallel size changed from {plan['data_parallel_size']} to "
            f"{now['data_parallel_size']}, and with data.batch_multiple=-1 batch sizes follow "
            f"it: set --config.data.batch_multiple={plan['data_parallel_size']} (a multiple of "
            "every data-parallel size the run will use) to resume this run exactly"
        )
    raise ValueError(
        f"the checkpoint's batch plan {plan['bucket_shapes']} differs from this run's "
        f"{now['bucket_shapes']} (data files or data settings changed?){hint}"
    )


def dev_loss(eval_step: Any, state: Any, loader: TrainLoader, mesh: Mesh) -> dict[str, float]:
    """Mean loss parts over one pass of the dev loader (no dropout, no update)."""
    totals: dict[str, float] = {}
    count = 0
    layout = sharding.batch_sharding(mesh)
    for _, host_batch in loader.iterate(LoaderPosition(), num_epochs=1):
        parts = jax.device_get(eval_step(state, to_global_batch(host_batch, layout)))
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        count += 1
    return {f"dev_loss/{k}": v / count for k, v in totals.items()}


def gather(tree: Any) -> Any:
    """Global (possibly multi-host) arrays → full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
