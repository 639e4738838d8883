"""The training run, read top to bottom: data, model, state, compile, evaluate, train, export.

Everything that shapes numerics lives in the pure step (step.py); this file does the I/O:
checkpoints (orbax, async, keep-N, resume from the latest), signals (SIGTERM/SIGINT save a
checkpoint before exiting), metrics (stdout, metrics.jsonl, TensorBoard) and the final export.
The run directory's layout is `m3_jax.run_dir`'s.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from m3_jax import checkpoint, flops, sharding
from m3_jax.config import PRESETS, ModelConfig, RunConfig
from m3_jax.convert.positions import extend_positions
from m3_jax.data.pipeline import LoaderPosition, TrainLoader, to_global_batch
from m3_jax.data.sources import open_sources
from m3_jax.loading import load_params
from m3_jax.model import Params, abstract_params, graphdef
from m3_jax.model.abstract import ModelClass
from m3_jax.model.retromae import retromae_params
from m3_jax.run_dir import (
    BEST_DIR,
    CHECKPOINT_DIR,
    EXPORT_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    save_model_dir,
    write_run_info,
)
from m3_jax.tokenization import check_tokenizer_matches, load_tokenizer
from m3_jax.training import sharded
from m3_jax.training.health import sparse_collapse_warning
from m3_jax.training.monitor import (
    BestParams,
    MetricsWriter,
    StopSignal,
    TrainingStopped,
    summarize_window,
)
from m3_jax.training.objectives import make_objective
from m3_jax.training.optim import make_optimizer
from m3_jax.training.programs import BucketPrograms
from m3_jax.training.state import TrainState, abstract_state

log = logging.getLogger(__name__)

EvalFn = Callable[[ModelConfig, Params, Path], dict[str, float]]  # (config, params, tokenizer)


class NonFiniteLossError(FloatingPointError):
    pass


def train(run: RunConfig, eval_fn: EvalFn | None = None) -> dict:
    """Trains per `run` (`m3_jax.config.run` documents every field); returns a summary dict.

    eval_fn(model_config, params, tokenizer_dir) -> {metric: value} runs before training
    (`eval.before_training`), every `eval.every` steps and at the end, together with the dev loss
    of `eval.loss_files`; the params with the best `eval.metric` are kept in `best/`.
    Multi-process runs call this on every process (after `jax.distributed.initialize`); only
    process 0 writes metrics and the summary.
    """
    started = time.perf_counter()
    workdir = Path(run.workdir)
    lead = jax.process_index() == 0
    show = run.train.progress and lead
    enable_compilation_cache(run.train.compilation_cache_dir)

    # The model and the data before anything is written: malformed files fail here (jsonl
    # files are prepared into data.cache_dir with the model's tokenizer).
    model_config, host_params, tokenizer_dir = load_initial_model(run)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_matches(tokenizer, model_config, tokenizer_dir)
    mesh = sharding.mesh_from_config(run.mesh)
    log.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    objective = make_objective(run, model_config, tokenizer)
    loader = make_loader(run, run.data.train_files, tokenizer_dir, tokenizer, mesh, show, objective)
    dev_loader = None
    if run.eval.loss_files:
        dev_loader = make_loader(
            run, run.eval.loss_files, tokenizer_dir, tokenizer, mesh, show, objective
        )
    total_steps = run.train.num_steps or run.train.num_epochs * loader.steps_per_epoch
    log_plan(loader, total_steps)
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        write_run_info(workdir, model_config, tokenizer_dir)

    # Optimizer, step and the sharded state: resumed from the newest checkpoint onto this mesh.
    model_class = objective.model_class
    abstract = abstract_params(float32(model_config), model_class)
    tx, schedule = make_optimizer(run.optim, total_steps, abstract)
    dp = sharding.data_parallel_size(mesh)
    step_config = functools.partial(objective.step_config, run, model_config, dp)
    layout = sharded.state_shardings(model_config, tx, mesh, run.mesh.rules, model_class)
    state_spec = sharded.with_shardings(abstract_state(abstract, tx), layout)
    # One program per bucket shape, compiling in the background from here on (programs.py).
    model = graphdef(model_config, model_class)
    train_fns = {
        flag: sharded.jit_train_step(
            model, tx, step_config(flag), layout, mesh, objective.train_step
        )
        for flag in {s.in_batch_negatives for s in loader.bucket_shapes()}
    }
    programs = BucketPrograms(
        train_fns,
        state_spec,
        loader.bucket_shapes(),
        objective.batch_spec,
        mesh,
        run.train.compile_workers,
    )
    log.info("compiling %d bucket programs on %d threads", len(programs), programs.workers)
    manager = checkpoint.make_manager(
        workdir / CHECKPOINT_DIR,
        keep=run.train.keep_checkpoints,
        async_save=run.train.async_checkpoint,
    )
    settings = plan_settings(run, mesh)
    try:
        state, start = resume_or_init(
            manager,
            model_config,
            host_params,
            tx,
            layout,
            state_spec,
            loader,
            settings,
            run.seed,
            model_class,
        )
    except BaseException:
        programs.close()
        raise
    del host_params
    with jax.set_mesh(mesh):
        eval_steps = {
            flag: sharded.jit_eval_step(model, step_config(flag), layout, mesh, objective.eval_loss)
            for flag in (False, True)
        }
    summary: dict[str, Any] = {}

    writer = MetricsWriter(workdir / METRICS_FILE) if lead else None
    evaluator = Evaluator(
        run, model_config, tokenizer_dir, eval_fn, dev_loader, eval_steps, mesh, writer, objective
    )
    try:
        if evaluator.active and run.eval.before_training and int(state.step) == 0:
            summary["eval_before"] = evaluator(state, 0)
        state, last_logged = train_steps(
            run,
            state,
            programs,
            schedule,
            loader,
            start,
            total_steps,
            model_config,
            manager,
            mesh,
            settings,
            evaluator,
            writer,
            show,
        )
        summary["compile_seconds"] = programs.wait_all()
        log.info("compiled %d bucket programs: %s", len(programs), summary["compile_seconds"])
        # Export params for M3Embedder.from_pretrained.
        params, mlm_head = objective.model_params(gather(state.params))
        export = workdir / EXPORT_DIR
        if not export.exists():
            save_model_dir(export, float32(model_config), params, tokenizer_dir, mlm_head)
        losses = {k: v for k, v in last_logged.items() if k.startswith("loss/")}
        summary.update(final_step=int(state.step), export=str(export), final_losses=losses)
        if evaluator.active:
            summary["eval_after"] = evaluator(state, int(state.step), params)
        if evaluator.best is not None and evaluator.best.step is not None:
            best = evaluator.best
            summary["best"] = {"step": best.step, run.eval.metric: best.value, "dir": str(best.out)}
    finally:
        programs.close()
        if writer is not None:
            writer.close()
    summary["train_seconds"] = round(time.perf_counter() - started, 1)
    if lead:
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# Setup --------------------------------------------------------------------------------------------


def float32(config: ModelConfig) -> ModelConfig:
    """The train state keeps float32 params whatever the model's storage dtype."""
    return config.replace(param_dtype="float32")


def enable_compilation_cache(cache_dir: str) -> None:
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_initial_model(run: RunConfig) -> tuple[ModelConfig, Params | None, Path]:
    """(model config, float32 host params or None for a fresh init, tokenizer dir) from
    `model.init_from` (its positions extended to `model.max_length`; for RetroMAE with its MLM
    head, or a fresh one, and a fresh decoder), or from `model.preset` and the tokenizer's
    vocabulary."""
    m = run.model
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
        retromae = run.objective == "retromae"  # BGE-M3's heads are not trained: none needed
        loaded = load_params(
            m.init_from,
            tokenizer_dir=m.tokenizer or None,
            fresh_heads=m.fresh_heads or retromae,
            **overrides,
        )
        config, params = loaded.config, loaded.params
        if m.max_length:
            config, params = extend_positions(config, params, m.max_length)
        if retromae:
            params = retromae_params(config, params["encoder"], loaded.mlm_head, run.seed)
        return config, params, loaded.tokenizer_dir
    if not m.tokenizer:
        raise ValueError(
            "model.tokenizer must name a tokenizer directory when model.init_from is unset"
        )
    if m.preset not in PRESETS:
        raise ValueError(f"model.preset={m.preset!r}; expected one of {sorted(PRESETS)}")
    vocab_size = len(load_tokenizer(m.tokenizer))
    config = PRESETS[m.preset](vocab_size=vocab_size, **m.geometry, **overrides)
    return config, None, Path(m.tokenizer)


def make_loader(
    run: RunConfig, files, tokenizer_dir: Path, tokenizer, mesh: Mesh, show: bool, objective
) -> TrainLoader:
    sources = open_sources(
        files, run.data, tokenizer_dir, process_index=jax.process_index(), progress=show
    )
    multiple = run.data.batch_multiple
    return TrainLoader(
        sources,
        run.data,
        seed=run.seed,
        batch_multiple=sharding.data_parallel_size(mesh) if multiple < 0 else multiple,
        pad_id=int(tokenizer.pad_token_id),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        transform=objective.transform,
    )


def log_plan(loader: TrainLoader, total_steps: int) -> None:
    if loader.num_unused_examples:
        log.warning(
            "%d examples fit no bucket that fills a global batch and are not used",
            loader.num_unused_examples,
        )
    log.info(
        "%d records, %d batches per epoch over %d buckets, %d steps",
        loader.num_records,
        loader.steps_per_epoch,
        len(loader.buckets),
        total_steps,
    )


def resume_or_init(
    manager,
    model_config,
    host_params,
    tx,
    layout,
    target,
    loader: TrainLoader,
    settings: dict,
    seed: int,
    model_class: ModelClass,
) -> tuple[TrainState, LoaderPosition]:
    """The newest checkpoint's state and loader position, or the step-0 state (imported params,
    else a fresh sharded init) at the start of the data. target: the state's ShapeDtypeStructs
    with their shardings."""
    restored = checkpoint.restore_latest(manager, target)
    if restored is not None:
        state, saved = restored
        check_same_plan(saved, loader, settings)
        position = LoaderPosition.from_json(saved)
        log.info("resumed from step %d at loader position %s", int(state.step), position)
        return state, position
    if host_params is None:
        params = sharded.fresh_params(model_config, seed, layout.params, model_class)
    else:
        params = sharding.put_global(host_params, layout.params)
    return sharded.initial_state(params, tx, seed, layout), LoaderPosition()


# Evaluation ---------------------------------------------------------------------------------------


class Evaluator:
    """The dev loss and eval_fn's metrics of the current params, written as eval/ rows of
    metrics.jsonl and offered to best/."""

    def __init__(
        self,
        run,
        model_config,
        tokenizer_dir,
        eval_fn,
        dev_loader,
        eval_steps,
        mesh,
        writer,
        objective,
    ):
        if eval_fn is not None and jax.process_count() > 1:
            # Retrieval evaluation places its corpus on this process's devices only.
            log.warning(
                "retrieval evaluation runs in single-process runs only; skipped here (the dev "
                "loss, eval.loss_files, works on any mesh; evaluate export/ with m3-jax evaluate)"
            )
            eval_fn = None
        self.model_config, self.tokenizer_dir = model_config, tokenizer_dir
        self.eval_fn, self.dev_loader, self.eval_steps = eval_fn, dev_loader, eval_steps
        self.mesh, self.writer, self.objective = mesh, writer, objective
        self.active = eval_fn is not None or dev_loader is not None
        workdir = Path(run.workdir)
        self.best = (
            BestParams(workdir / BEST_DIR, run.eval.metric, run.eval.mode) if self.active else None
        )

    def __call__(
        self, state: TrainState, step: int, host_params: Params | None = None
    ) -> dict[str, float]:
        """`host_params`: the params already gathered to the host, when the caller has them."""
        metrics = {}
        if self.dev_loader is not None:
            with jax.set_mesh(self.mesh):
                metrics.update(dev_loss(self.eval_steps, state, self.dev_loader, self.mesh))
        if self.eval_fn is not None:
            embedder_params, _ = self.objective.model_params(state.params)
            metrics.update(self.eval_fn(self.model_config, embedder_params, self.tokenizer_dir))
        log.info("evaluation at step %d: %s", step, metrics)
        if self.writer is not None:
            self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if host_params is None:
            host_params, _ = self.objective.model_params(gather(state.params))
        self.best.offer(step, metrics, self.model_config, host_params, self.tokenizer_dir)
        return metrics


def dev_loss(
    eval_steps: dict[bool, Any], state: Any, loader: TrainLoader, mesh: Mesh
) -> dict[str, float]:
    """Mean loss parts over one pass of the dev loader (no dropout, no update);
    `eval_steps[in_batch_negatives]` is the step for each kind of batch."""
    totals: dict[str, float] = {}
    count = 0
    layout = sharding.batch_sharding(mesh)
    for _, shape, host_batch in loader.iterate(LoaderPosition(), num_epochs=1):
        eval_step = eval_steps[shape.in_batch_negatives]
        parts = jax.device_get(eval_step(state, to_global_batch(host_batch, layout)))
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        count += 1
    return {f"dev_loss/{k}": v / count for k, v in totals.items()}


# The steps ----------------------------------------------------------------------------------------


def train_steps(
    run: RunConfig,
    state: TrainState,
    programs: BucketPrograms,
    schedule: Callable[[int], float],
    loader: TrainLoader,
    start: LoaderPosition,
    total_steps: int,
    model_config: ModelConfig,
    manager: Any,
    mesh: Mesh,
    settings: dict,
    evaluate: Evaluator,
    writer: MetricsWriter | None,
    show: bool,
) -> tuple[TrainState, dict[str, float]]:
    """Steps from `state` to `total_steps`: metric windows, periodic evaluation, checkpoints, and
    a final save on SIGTERM/SIGINT (then TrainingStopped). Returns the state and the last logged
    metrics ({} when none was logged, as on a finished run resumed)."""
    t = run.train
    peak = t.peak_flops_per_s or flops.measure_matmul_peak()
    stop = StopSignal()
    batch_layout = sharding.batch_sharding(mesh)
    step = int(state.step)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not show)
    window: list[dict] = []
    record: dict[str, float] = {}
    warned_sparse = False
    window_start = time.perf_counter()
    try:
        for position, shape, host_batch in loader.iterate(start):
            if step >= total_steps:
                break
            batch = to_global_batch(host_batch, batch_layout)
            state, metrics = programs[shape](state, batch, np.float32(schedule(step)))
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
            if step % t.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = summarize_window(window, elapsed, model_config, peak)
                if writer is not None:
                    writer.write(step, record)
                progress.set_postfix(loss=f"{record['loss/loss']:.4f}")
                warning = sparse_collapse_warning(record, t.sparse_health_threshold)
                if warning and not warned_sparse:
                    log.warning("step %d: %s", step, warning)
                    warned_sparse = True
                if show:
                    tqdm.write(
                        f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items())
                    )
                window, window_start = [], time.perf_counter()
            pause_start = time.perf_counter()  # evaluations and saves count in no throughput
            if (
                evaluate.active
                and run.eval.every
                and step % run.eval.every == 0
                and step < total_steps
            ):
                evaluate(state, step)
            stopping = stop.agreed()
            if step % t.save_every == 0 or step == total_steps or stopping:
                checkpoint.save(manager, step, state, loader_json(position, loader, settings))
            window_start += time.perf_counter() - pause_start
            if stopping:
                manager.wait_until_finished()
                raise TrainingStopped(stop.received, step)
    finally:
        progress.close()
        stop.restore()
        manager.wait_until_finished()
        manager.close()
    return state, record


def plan_settings(run: RunConfig, mesh: Mesh) -> dict:
    """The settings a batch plan follows (the data section, the seed, the data-parallel size),
    saved with each checkpoint so that a refused resume can name what changed."""
    data = {f"data.{k}": v for k, v in dataclasses.asdict(run.data).items()}
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}  # as JSON reads
    return {**data, "seed": run.seed, "data_parallel_size": sharding.data_parallel_size(mesh)}


def loader_json(position: LoaderPosition, loader: TrainLoader, settings: dict) -> dict:
    """The loader position plus what it refers to (the batch plan and its settings), saved with
    a checkpoint."""
    return {
        **position.to_json(),
        "plan": {
            "steps_per_epoch": loader.steps_per_epoch,
            "bucket_shapes": [list(s) for s in loader.bucket_shapes()],
            "data_parallel_size": settings["data_parallel_size"],
            "settings": settings,
        },
    }


def check_same_plan(saved: dict, loader: TrainLoader, settings: dict) -> None:
    """A checkpoint's (epoch, step) names a batch of its own run's plan: resuming with other
    batch sizes would silently skip or repeat data, so that is an error that says what changed."""
    plan = saved.get("plan")
    if plan is None:  # checkpoints from before the plan was recorded
        return
    now = loader_json(LoaderPosition(), loader, settings)["plan"]
    if plan["bucket_shapes"] == now["bucket_shapes"]:
        return
    before = plan.get("settings", {})
    changed = [
        f"{key} {before[key]!r} -> {value!r}"
        for key, value in settings.items()
        if key in before and before[key] != value
    ]
    cause = (
        f"changed settings: {'; '.join(changed)}"
        if changed
        else "the settings are the same, so the training data changed"
    )
    hint = ""
    if plan["data_parallel_size"] != now["data_parallel_size"]:
        hint = (
            f"; with data.batch_multiple=-1 batch sizes follow the data-parallel size: set "
            f"--config.data.batch_multiple={plan['data_parallel_size']} (a multiple of every "
            "data-parallel size the run will use) to resume this run exactly"
        )
    raise ValueError(
        f"cannot resume: the checkpoint's batch plan differs from this run's ({cause}){hint}; "
        f"checkpoint's bucket shapes {plan['bucket_shapes']}, this run's {now['bucket_shapes']}"
    )


def gather(tree: Any) -> Any:
    """Global (possibly multi-host) arrays → full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
