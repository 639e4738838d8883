"""Model configuration: XLM-RoBERTa geometry, M3 head options, dtypes and attention choice."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

AttentionImpl = Literal["xla", "chunked", "cudnn", "splash"]
ATTENTION_IMPLS: tuple[str, ...] = ("xla", "chunked", "cudnn", "splash")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shape and numerics of an M3 model.

    Geometry fields follow the transformers `XLMRobertaConfig` names where one exists.
    """

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 8194
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 1
    cls_token_id: int = 0
    eos_token_id: int = 2
    unk_token_id: int = 3
    # M3 heads. colbert_dim <= 0 means hidden_size, as in FlagEmbedding.
    colbert_dim: int = -1
    normalize_embeddings: bool = True
    # Numerics and memory.
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: AttentionImpl = "xla"
    attention_chunk_size: int = 512
    remat: bool = False
    scan_layers: bool = False  # one lax.scan over the layers: one layer to compile, not N

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.attention_chunk_size <= 0:
            raise ValueError(
                f"attention_chunk_size must be positive, got {self.attention_chunk_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def colbert_out_dim(self) -> int:
        return self.hidden_size if self.colbert_dim <= 0 else self.colbert_dim

    @property
    def max_length(self) -> int:
        """Longest input (special tokens included) the position table can hold.

        RoBERTa positions start at pad_token_id + 1, so `max_position_embeddings - pad - 1` tokens fit.
        """
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids whose sparse weight is always zero (cls, eos, pad, unk), as in FlagEmbedding."""
        return (self.cls_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a transformers XLM-R `config.json` dict; `overrides` set M3 and numerics options."""
        model_type = hf.get("model_type")
        if model_type not in ("xlm-roberta", "roberta", None):
            raise ValueError(f"config.json has model_type={model_type!r}; expected 'xlm-roberta'")
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json has hidden_act={act!r}; only exact 'gelu' is supported")
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"config.json has position_embedding_type={pos_type!r}; only 'absolute' is supported"
            )
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required fields {missing}")
        values: dict[str, Any] = {k: int(hf[k]) for k in required}
        values["type_vocab_size"] = int(hf.get("type_vocab_size", 1))
        values["layer_norm_eps"] = float(hf.get("layer_norm_eps", 1e-5))
        values["hidden_dropout_prob"] = float(hf.get("hidden_dropout_prob", 0.1))
        values["attention_probs_dropout_prob"] = float(hf.get("attention_probs_dropout_prob", 0.1))
        values["initializer_range"] = float(hf.get("initializer_range", 0.02))
        values["pad_token_id"] = int(hf.get("pad_token_id", 1))
        values["cls_token_id"] = int(hf.get("bos_token_id", 0))
        values["eos_token_id"] = int(hf.get("eos_token_id", 2))
        values.update(overrides)
        return cls(**values)

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers `XLMRobertaModel` config.json for this geometry."""
        return {
            "architectures": ["XLMRobertaModel"],
            "model_type": "xlm-roberta",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.cls_token_id,
            "eos_token_id": self.eos_token_id,
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: expected a JSON object of ModelConfig fields, got {type(values).__name__}"
            )
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


def bge_m3(**overrides: Any) -> ModelConfig:
    """The exact BAAI/bge-m3 geometry (XLM-R large, 8194 positions, colbert dim 1024)."""
    return ModelConfig(**overrides)


def base_size(**overrides: Any) -> ModelConfig:
    """XLM-R base geometry (12 layers, 768 hidden): the benchmark's middle size."""
    values: dict[str, Any] = dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny(vocab_size: int = 1002, **overrides: Any) -> ModelConfig:
    """A few-layer model for tests and the CPU demo; vocab matches the tokenizer built for it."""
    values: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=514,
    )
    values.update(overrides)
    return ModelConfig(**values)


PRESETS = {"bge_m3": bge_m3, "base_size": base_size, "tiny": tiny}
