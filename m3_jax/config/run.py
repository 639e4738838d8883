"""Every knob of a training run, with its default and what it does, written once.

A run's configuration is a `RunConfig` of sections (`model`, `data`, `loss`, `mesh`, `distributed`,
`optim`, `train`, `eval`). Config files (`configs/*.py`) start from `RunConfig().to_config_dict()`,
an `ml_collections.ConfigDict` that the command line overrides (`--config.optim.lr=1e-4`); the
training loop takes the typed config built from it once (`RunConfig.from_config_dict`), so a
typo'd or mistyped key fails before anything runs. `m3-jax train --help` lists every key with
its default and the one-line description given here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ml_collections import ConfigDict

from m3_jax.bucketing import TRAINING_LENGTHS

KDLossType = Literal["m3_kd_loss", "kl_div"]

# Logical parameter axis -> mesh axis (None = replicated); see m3_jax.sharding.
FSDP_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", None),  # 250002 rows divide by no device count; the table splits on `embed`
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("colbert", "tensor"),
)


def knob(default: Any, doc: str) -> Any:
    """A dataclass field with its one-line description (shown by `m3-jax train --help`)."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the run's model comes from, and how it computes."""

    init_from: str = knob("", "m3_jax dir, run dir, BGE-M3 PyTorch dir or hub id; '' = preset")
    fresh_heads: bool = knob(False, "allow a PyTorch checkpoint without colbert/sparse head files")
    tokenizer: str = knob("", "tokenizer dir; '' = the init_from dir")
    max_length: int = knob(
        0, "extend init_from's position table to this many tokens (tiled rows); 0 = as is"
    )
    preset: str = knob("bge_m3", "geometry of a fresh init: bge_m3, base_size or tiny")
    geometry: dict = knob({}, "ModelConfig field overrides for a fresh init (hidden_size=...)")
    dtype: str = knob("float32", "compute dtype: float32 or bfloat16 (params stay float32)")
    param_dtype: str = knob("float32", "parameter storage dtype")
    attention_impl: str = knob(
        "xla", "xla, chunked (long inputs on CPU), cudnn (GPU), splash (TPU)"
    )
    attention_chunk_size: int = knob(512, "query block of the chunked attention")
    attention_probs_dropout_prob: float = knob(-1.0, "-1 = the model's; cudnn/splash train with 0")
    remat: bool = knob(False, "recompute each layer in the backward pass (less memory, +1 forward)")
    scan_layers: bool = knob(False, "lax.scan over the layers: one layer to compile instead of N")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data, the group of passages per query, and the static batch shapes."""

    train_files: str | tuple[str, ...] = knob(
        "", "prepared dirs, jsonl files or directories of them: comma-separated or a tuple"
    )
    cache_dir: str = knob("~/.cache/m3_jax/data", "where jsonl train_files are prepared")
    sampling_weights: tuple[float, ...] = knob(
        (), "one per train_files entry: epochs' share of its examples (2 = twice); () = all 1"
    )
    small_threshold: int = knob(0, "files of a directory below this many records merge")
    drop_threshold: int = knob(0, "merged small files below this many records are dropped")
    group_size: int = knob(8, "1 positive + G-1 negatives per query (train_group_size)")
    query_max_len: int = knob(512, "queries are truncated to this many tokens")
    passage_max_len: int = knob(8192, "passages are truncated to this many tokens")
    passage_buckets: tuple[int, ...] = knob(TRAINING_LENGTHS, "static passage lengths, ascending")
    token_budget: int = knob(65536, "query + passage tokens per global batch (sets batch sizes)")
    batch_size_preset: str | None = knob(None, "'flag_embedding': the paper's per-length table")
    max_batch_size: int = knob(1024, "cap on the global batch size of any bucket; 0 = no cap")
    batch_multiple: int = knob(-1, "global batch sizes are multiples of this; -1 = data-parallel")
    query_instruction: str | None = knob(None, "prepended to every query (a record's prompt wins)")
    passage_instruction: str | None = knob(None, "prepended to every passage")
    instruction_format: str = knob("{}{}", "how an instruction and a text are joined")
    knowledge_distillation: bool = knob(False, "use pos_scores/neg_scores as teacher scores")
    sort_negatives_by_teacher: bool = knob(False, "old FlagEmbedding order for m3_kd_loss")

    def __post_init__(self) -> None:
        for name in ("group_size", "query_max_len", "passage_max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.max_batch_size < 0:
            raise ValueError(
                f"data.max_batch_size must be >= 0 (0 = no cap), got {self.max_batch_size}"
            )
        if any(w < 0 for w in self.sampling_weights):
            raise ValueError(f"data.sampling_weights must be >= 0, got {self.sampling_weights}")
        # <s> and </s> take two tokens; a shorter limit leaves no room for text.
        if min(self.query_max_len, self.passage_max_len) < 3:
            raise ValueError("data.query_max_len and data.passage_max_len must be at least 3")
        try:
            probe = self.instruction_format.format("\x00I", "\x00T")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"data.instruction_format {self.instruction_format!r}: {e}") from None
        if probe.find("\x00I") < 0 or probe.find("\x00T") < probe.find("\x00I"):
            raise ValueError(
                f"data.instruction_format {self.instruction_format!r} must contain two '{{}}' "
                "fields: the instruction, then the text"
            )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The M3 objective (FlagEmbedding's argument names in the descriptions)."""

    temperature: float = knob(0.02, "every score is divided by it (temperature)")
    unified: bool = knob(True, "sparse + colbert + ensemble losses; False = dense only")
    self_distill: bool = knob(True, "self-knowledge distillation from the ensemble")
    self_distill_start_step: int = knob(-1, "self-distillation active when step > this")
    kd_loss_type: KDLossType = knob("m3_kd_loss", "with teacher scores: m3_kd_loss or kl_div")
    in_batch_negatives: bool = knob(True, "False: each query sees only its own group")
    cross_device_negatives: bool = knob(True, "dense loss over the global batch")
    ddp_dense_grad_scale: bool = knob(False, "scale that dense gradient by 1/shards, as DDP does")
    dense_row_block: int = knob(
        1024, "most query rows per device in a block of the whole-batch dense loss; 0 = all at once"
    )
    num_shards: int = knob(
        -1, "local groups of the sparse/colbert/ensemble losses; -1 = data-parallel"
    )
    ensemble_weights: tuple[float, float, float] = knob(
        (1.0, 0.3, 1.0), "dense, sparse, colbert weights inside the ensemble (teacher) score"
    )
    loss_weights: tuple[float, float, float] = knob(
        (1.0, 0.1, 1.0), "dense, sparse, colbert loss weights"
    )

    def __post_init__(self) -> None:
        if self.dense_row_block < 0:
            raise ValueError(
                f"loss.dense_row_block must be >= 0 (0 = all rows), got {self.dense_row_block}"
            )
        if self.kd_loss_type not in typing.get_args(KDLossType):
            raise ValueError(
                f"loss.kd_loss_type={self.kd_loss_type!r}; expected one of "
                f"{typing.get_args(KDLossType)}"
            )


@dataclasses.dataclass(frozen=True)
class RetroMAEConfig:
    """RetroMAE pre-training (`objective="retromae"`): FlagEmbedding's defaults, see
    `m3_jax.data.mlm_masks` for how masks are sampled."""

    encoder_mask_ratio: float = knob(0.3, "share of a text's tokens the encoder predicts")
    decoder_mask_ratio: float = knob(0.5, "share of the keys each decoder query cannot see")
    whole_word_mask: bool = knob(
        False, "hide whole sentencepiece words (False: the reference on XLM-R)"
    )
    decoder_masks: int = knob(128, "masks sampled per text for the decoder's queries to draw from")
    max_masked_tokens: int = knob(
        512, "most tokens one mask hides (transformers' max_predictions); 0 = no cap"
    )
    loss_chunk_tokens: int = knob(1024, "tokens per block of the MLM head's [tokens, vocab] logits")

    def __post_init__(self) -> None:
        for name in ("encoder_mask_ratio", "decoder_mask_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"retromae.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.decoder_masks < 1:
            raise ValueError(f"retromae.decoder_masks must be >= 1, got {self.decoder_masks}")
        if self.max_masked_tokens < 0:
            raise ValueError(
                f"retromae.max_masked_tokens must be >= 0 (0 = no cap), got {self.max_masked_tokens}"
            )
        if self.loss_chunk_tokens < 1:
            raise ValueError(
                f"retromae.loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}"
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The ("data", "fsdp", "tensor") device mesh and how parameters are laid out on it."""

    data: int = knob(1, "data-parallel devices per slice (replicated params); -1 = the rest")
    fsdp: int = knob(-1, "fully sharded data-parallel devices per slice; -1 = the rest")
    tensor: int = knob(1, "tensor-parallel devices (attention heads and MLP split)")
    dcn_data: int = knob(1, "multi-slice: slices along the data axis (data-centre network)")
    dcn_fsdp: int = knob(1, "multi-slice: slices along the fsdp axis")
    rules: tuple = knob(FSDP_RULES, "logical parameter axis -> mesh axis (None = replicated)")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    initialize: bool = knob(False, "multi-process: jax.distributed.initialize() before anything")
    coordinator_address: str = knob("", "host:port of process 0; '' = detect (TPU pods, SLURM)")
    num_processes: int = knob(0, "0 = detect")
    process_id: int = knob(-1, "-1 = detect")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a linear warm-up/decay schedule."""

    lr: float = knob(1e-5, "peak learning rate")
    warmup_ratio: float = knob(0.1, "share of steps warming up linearly from 0")
    warmup_steps: int | None = knob(None, "overrides warmup_ratio when set")
    weight_decay: float = knob(0.01, "AdamW decay, not on biases and LayerNorm")
    b1: float = knob(0.9, "Adam beta1")
    b2: float = knob(0.999, "Adam beta2")
    eps: float = knob(1e-8, "Adam epsilon")
    max_grad_norm: float = knob(1.0, "global-norm clipping; <= 0 disables")
    fix_encoder: bool = knob(False, "train only the colbert and sparse heads")
    fix_position_embedding: bool = knob(False, "freeze the position embeddings")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = knob(0, "optimizer steps; 0 = num_epochs over the data")
    num_epochs: int = knob(1, "used when num_steps is 0")
    sub_batch_size: int | None = knob(None, "split-batch: rows per device per encoder call")
    dropout: bool = knob(True, "XLM-R dropout in training")
    log_every: int = knob(10, "steps between metric lines")
    save_every: int = knob(500, "steps between checkpoints")
    keep_checkpoints: int = knob(3, "newest checkpoints kept")
    async_checkpoint: bool = knob(True, "write checkpoints in the background")
    compilation_cache_dir: str = knob("~/.cache/m3_jax/xla", "persistent XLA cache; '' = off")
    compile_workers: int = knob(
        -1, "threads compiling the bucket programs ahead of their first step; -1 = one per 2 cores"
    )
    peak_flops_per_s: float = knob(0.0, "for MFU; 0 = measure a large matmul at start")
    progress: bool = knob(True, "progress bars and metric lines on stdout")
    sparse_health_threshold: float = knob(
        0.05, "warn once when fewer content tokens than this share get a sparse weight"
    )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    dataset: str = knob("", "BEIR / MIRACL directory for retrieval evaluation")
    split: str = knob("", "its qrels split ('' = test, else dev, else the only one)")
    modes: str = knob("dense,sparse,colbert,sparse+dense,colbert+sparse+dense", "retrieval modes")
    heldout_file: str = knob("", "or: jsonl of held-out queries with relevant corpus ids")
    corpus_file: str = knob("", "jsonl corpus ({'id', 'text'}) for the held-out queries")
    loss_files: str = knob("", "jsonl in the training format: mean dev loss parts")
    every: int = knob(0, "steps between evaluations during training; 0 = before and after only")
    before_training: bool = knob(True, "also evaluate the initial model")
    metric: str = knob("colbert+sparse+dense/ndcg@10", "the metric that picks best/")
    mode: str = knob("max", "whether a larger (max) or smaller (min) metric is better")
    k: int = knob(10, "cutoff of nDCG@k, Recall@k, MRR@k")
    batch_size: int = knob(64, "encode batch size")

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"eval.mode must be 'max' or 'min', got {self.mode!r}")


SECTIONS = {
    "model": ModelSource,
    "data": DataConfig,
    "loss": LossConfig,
    "mesh": MeshConfig,
    "distributed": DistributedConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "retromae": RetroMAEConfig,
}
OBJECTIVES = ("m3", "retromae")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = knob(
        "runs/base", "checkpoints, metrics.jsonl, tensorboard/, export/, best/, summary.json"
    )
    seed: int = knob(0, "init, data order, group sampling and dropout all derive from it")
    objective: str = knob(
        "m3", "m3: contrastive (fine-tuning, unsupervised); retromae: RetroMAE pre-training"
    )
    model: ModelSource = dataclasses.field(default_factory=ModelSource)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    retromae: RetroMAEConfig = dataclasses.field(default_factory=RetroMAEConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; expected one of {OBJECTIVES}")
        if self.objective == "retromae" and self.data.group_size != 1:
            raise ValueError(
                f"objective='retromae' trains on one text per row: set data.group_size=1 "
                f"(got {self.data.group_size})"
            )

    def to_config_dict(self) -> Any:
        """An `ml_collections.ConfigDict` of every key (what config files start from)."""
        return ConfigDict(dataclasses.asdict(self))

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> RunConfig:
        """The typed config of a ConfigDict (or nested mapping); unknown keys are errors."""
        values = _plain(config)
        _check_keys(values, cls, "")
        sections = {
            name: _build(section, values.get(name, {}), name) for name, section in SECTIONS.items()
        }
        top = {k: v for k, v in values.items() if k not in SECTIONS}
        return cls(**top, **sections)

    def doc_lines(self) -> list[tuple[str, Any, str]]:
        """(dotted key, value, description) for every key, in section order."""
        rows = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value):
                rows += [
                    (f"{field.name}.{f.name}", getattr(value, f.name), f.metadata.get("doc", ""))
                    for f in dataclasses.fields(value)
                ]
            else:
                rows.append((field.name, value, field.metadata.get("doc", "")))
        return rows


def _plain(value: Any) -> Any:
    """ConfigDicts and lists → dicts and tuples (what the frozen dataclasses hold)."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _check_keys(values: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown config keys {[prefix + k for k in unknown]}; "
            f"{prefix or 'top-level '}keys are {sorted(known)}"
        )


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"config key {section!r} must be a section, got {values!r}")
    _check_keys(values, cls, f"{section}.")
    hints = typing.get_type_hints(cls)
    return cls(**{k: dict(v) if hints[k] is dict else v for k, v in values.items()})
