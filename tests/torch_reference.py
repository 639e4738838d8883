"""A PyTorch-only BGE-M3 reference for parity tests.

Nothing here imports m3_jax's model, conversion or scoring code: the checkpoint directory is
written with transformers/torch alone, and the reference outputs are computed from the formulas of
FlagEmbedding's inference path (BGEM3FlagModel: the three heads, their scores, compute_score):

- dense   = normalize(H[:, 0])
- sparse  = relu(sparse_linear(H)); dict {str(id): max w} over positions with w > 0 and
            id not in {cls, eos, pad, unk}
- colbert = normalize(colbert_linear(H[:, 1:]) * mask[:, 1:, None]), keeping the first
            (num_tokens - 1) rows
- compute_score: dense dot, sparse dot of max-pooled [V] vocab vectors (special columns zeroed),
  colbert by the unpadded single-pair formula, and the two weight-normalised combinations.

The encoder is transformers' `XLMRobertaModel` (eager attention, fp32, eval mode) with weights read
strictly from the directory; the heads are the fp16 `.pt` files upcast to fp32.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOKENIZER_FILES = (
    "sentencepiece.bpe.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SCORE_MODES = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")

# The tiny geometry of the release's architecture (XLM-R, post-LN, RoBERTa positions).
TINY_GEOMETRY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=514,
)


# Building a BGE-M3-layout directory ------------------------------------------------------------


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def xlmr_config(vocab_size: int, **geometry):
    """An `XLMRobertaConfig` like BAAI/bge-m3's (eps 1e-5, pad 1, bos 0, eos 2) at a small size."""
    from transformers import XLMRobertaConfig

    values = dict(TINY_GEOMETRY)
    values.update(geometry)
    return XLMRobertaConfig(
        vocab_size=vocab_size,
        type_vocab_size=1,
        layer_norm_eps=values.pop("layer_norm_eps", 1e-5),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_act="gelu",
        position_embedding_type="absolute",
        **values,
    )


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Realistic random weights in place: fan-in scaled linear weights, word embeddings N(0, 1),
    other embeddings N(0, 0.5), LayerNorm gains 1 + N(0, 0.1), biases N(0, 0.1).

    (A flat N(0, 0.02) init makes every output nearly constant and hides bugs.)
    """

    def normal(shape, std, mean=0.0):
        return mean + std * torch.randn(shape, generator=generator, dtype=torch.float32)

    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "LayerNorm" in name or "layer_norm" in name:
            param.copy_(normal(param.shape, 0.1, 1.0 if leaf == "weight" else 0.0))
        elif "word_embeddings" in name:
            param.copy_(normal(param.shape, 1.0))
        elif "embeddings" in name:
            param.copy_(normal(param.shape, 0.5))
        elif leaf == "weight" and param.ndim == 2:
            param.copy_(normal(param.shape, param.shape[1] ** -0.5))
        elif leaf == "bias":
            param.copy_(normal(param.shape, 0.1))
        else:
            raise ValueError(f"no init rule for {name} {tuple(param.shape)}")


def build_torch_m3_dir(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    serialization: str = "safetensors",
    masked_lm: bool = False,
    sparse_bias: float = 0.05,
    sparse_scale: float = 0.25,
    attention_sharpness: float = 3.0,
    **geometry,
) -> Path:
    """Writes a BGE-M3-layout directory with PyTorch only.

    config.json + model.safetensors (or pytorch_model.bin) from `XLMRobertaModel` (pooler
    included, as `save_pretrained` writes it), or from `XLMRobertaForMaskedLM` ('roberta.' prefix
    and lm_head.*) when `masked_lm`; fp16 `colbert_linear.pt` / `sparse_linear.pt` head state
    dicts; and the tokenizer files. `attention_sharpness` scales the query and key weights.
    The same seed gives the same encoder and head weights whatever
    the serialization or architecture.
    """
    from transformers import XLMRobertaForMaskedLM, XLMRobertaModel

    if serialization not in ("safetensors", "bin"):
        raise ValueError(f"serialization must be 'safetensors' or 'bin', got {serialization!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    config = xlmr_config(tokenizer_vocab_size(tokenizer_dir), **geometry)
    generator = torch.Generator().manual_seed(seed)

    encoder = XLMRobertaModel(config)  # with the pooler, which M3 must ignore
    randomize_(encoder, generator)
    with torch.no_grad():
        # Sharp attention, as in trained models: with fan-in scaled query/key weights every token
        # attends almost uniformly, all hidden states look alike and colbert similarities are
        # all positive (so a 0-floor from padded rows could never show).
        for layer in encoder.encoder.layer:
            layer.attention.self.query.weight.mul_(attention_sharpness)
            layer.attention.self.key.weight.mul_(attention_sharpness)
    hidden = config.hidden_size
    colbert_linear = nn.Linear(hidden, hidden)
    sparse_linear = nn.Linear(hidden, 1)
    randomize_(colbert_linear, generator)
    randomize_(sparse_linear, generator)
    with torch.no_grad():
        # A positive bias so that a good share of the sparse weights survive the ReLU.
        sparse_linear.weight.mul_(sparse_scale)  # weights of a few tenths, like the release
        sparse_linear.bias.fill_(sparse_bias)

    model: nn.Module = encoder
    if masked_lm:
        model = XLMRobertaForMaskedLM(config)
        randomize_(model.lm_head, torch.Generator().manual_seed(seed + 1))
        encoder_state = {
            k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.")
        }
        model.roberta.load_state_dict(encoder_state, strict=True)
    model.eval()
    model.save_pretrained(str(out))  # config.json and model.safetensors
    if serialization == "bin":
        # transformers 5 always writes safetensors; write the classic pickle file the release has.
        (out / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out / "pytorch_model.bin")

    torch.save(colbert_linear.half().state_dict(), out / "colbert_linear.pt")
    torch.save(sparse_linear.half().state_dict(), out / "sparse_linear.pt")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def build_torch_reranker_dir(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    serialization: str = "safetensors",
    attention_sharpness: float = 3.0,
    **geometry,
) -> Path:
    """Writes a cross-encoder directory like BAAI/bge-reranker-v2-m3's with PyTorch only:
    `XLMRobertaForSequenceClassification` with one label (config.json, model.safetensors or
    pytorch_model.bin) and the tokenizer files."""
    from transformers import XLMRobertaForSequenceClassification

    if serialization not in ("safetensors", "bin"):
        raise ValueError(f"serialization must be 'safetensors' or 'bin', got {serialization!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    config = xlmr_config(tokenizer_vocab_size(tokenizer_dir), num_labels=1, **geometry)
    model = XLMRobertaForSequenceClassification(config)
    randomize_(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in model.roberta.encoder.layer:
            layer.attention.self.query.weight.mul_(attention_sharpness)
            layer.attention.self.key.weight.mul_(attention_sharpness)
    model.eval()
    model.save_pretrained(str(out))
    if serialization == "bin":
        (out / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out / "pytorch_model.bin")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def read_torch_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The encoder state dict in the directory (safetensors first, like transformers)."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(d / "model.safetensors"))
    return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)


def write_torch_state(model_dir: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Overwrites the directory's encoder weights file in its own format."""
    d = Path(model_dir)
    if (d / "model.safetensors").is_file():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    else:
        torch.save(state, d / "pytorch_model.bin")


# Test texts ------------------------------------------------------------------------------------


def make_texts(tokenizer, seed: int = 0) -> list[str]:
    """Texts from 1 content token to a few hundred tokens, in every script of the tiny
    tokenizer's corpus (m3_jax.tiny.SCRIPTS) and mixed, with repeated words, unknown characters
    (-> <unk>), and a literal <mask> (a special id FlagEmbedding does not drop from sparse)."""
    from m3_jax.tiny import SCRIPTS

    rng = random.Random(seed)

    def words(n: int, alphabet: str | None = None) -> str:
        out = []
        for _ in range(n):
            chars = alphabet or rng.choice(SCRIPTS[:-1])
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 8))))
        return " ".join(out)

    # A text of exactly one content token: a whole-word piece of the vocabulary.
    one_token = None
    for piece in tokenizer.convert_ids_to_tokens(list(range(5, len(tokenizer) - 1))):
        candidate = piece.replace("\u2581", " ").strip()
        if candidate and len(tokenizer(candidate)["input_ids"]) == 3:
            one_token = candidate
            break
    assert one_token is not None, "no text of one token in the vocabulary"

    latin, cyrillic, greek, cjk, arabic, digits = SCRIPTS
    texts = [
        one_token,
        "a",
        words(3, latin),
        words(5, cyrillic),
        words(4, greek),
        "".join(rng.choice(cjk) for _ in range(12)),
        words(6, arabic),
        "абв абв абв абв гд абв",  # repeated ids: max over positions
        "नमस्ते 😀 " + words(3, latin) + " ☃",  # characters outside the vocab -> <unk>
        words(4, latin) + " <mask> " + words(3, greek),
        words(5, digits),
        words(30),
        words(60, cyrillic),
        words(120),  # a few hundred tokens
        " ".join([words(20, s) for s in SCRIPTS[:5]]),
    ]
    return texts


# The reference model ---------------------------------------------------------------------------


class TorchM3Reference:
    """FlagEmbedding's M3 inference path, in fp32 PyTorch, from a BGE-M3-layout directory."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

        d = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        assert self.tokenizer.padding_side == "right"
        config = XLMRobertaConfig.from_pretrained(str(d), attn_implementation="eager")
        self.model = XLMRobertaModel(config, add_pooling_layer=False)
        state = {k: v for k, v in read_torch_state(d).items() if not k.startswith("pooler.")}
        self.model.load_state_dict(state, strict=True)
        self.model.float().eval()
        self.colbert_linear = self._head(d / "colbert_linear.pt")
        self.sparse_linear = self._head(d / "sparse_linear.pt")
        self.vocab_size = config.vocab_size
        tok = self.tokenizer
        self.unused_tokens = sorted(
            {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
        )

    @staticmethod
    def _head(path: Path) -> nn.Linear:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["weight"].dtype == torch.float16, f"{path} is not fp16"
        out_dim, in_dim = state["weight"].shape
        head = nn.Linear(in_dim, out_dim)
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head.float().eval()

    def tokenize(self, texts: Sequence[str], max_length: int):
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def forward(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        batch = self.tokenize(texts, max_length)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        dense = F.normalize(hidden[:, 0], dim=-1)
        token_weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        colbert = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
        colbert = F.normalize(colbert, dim=-1)
        return dict(
            input_ids=ids,
            attention_mask=mask,
            dense=dense,
            token_weights=token_weights,
            colbert=colbert,
        )

    def lexical_dict(self, token_weights: np.ndarray, input_ids: Sequence[int]) -> dict:
        result: dict[str, float] = defaultdict(int)
        for weight, token_id in zip(token_weights, input_ids, strict=True):
            if token_id not in self.unused_tokens and weight > 0:
                key = str(token_id)
                if weight > result[key]:
                    result[key] = weight
        return dict(result)

    def encode(self, texts: Sequence[str], max_length: int = 512, batch_size: int = 4) -> dict:
        """Plain sequential batches (the old BGEM3FlagModel), each padded to its longest text."""
        dense, lexical, colbert = [], [], []
        for start in range(0, len(texts), batch_size):
            out = self.forward(texts[start : start + batch_size], max_length)
            dense.append(out["dense"].numpy())
            weights = out["token_weights"].numpy()
            ids = out["input_ids"].tolist()
            for row in range(len(ids)):
                lexical.append(self.lexical_dict(weights[row], ids[row]))
                num_tokens = int(out["attention_mask"][row].sum())
                colbert.append(out["colbert"][row, : num_tokens - 1].numpy())
        return {
            "dense_vecs": np.concatenate(dense),
            "lexical_weights": lexical,
            "colbert_vecs": colbert,
        }

    def sparse_vocab_vectors(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, V]: max weight per token id (scatter_reduce 'amax' over zeros), specials zeroed."""
        weights = out["token_weights"]
        vectors = torch.zeros(weights.shape[0], self.vocab_size, dtype=weights.dtype)
        vectors = vectors.scatter_reduce(
            -1, out["input_ids"], weights, reduce="amax", include_self=True
        )
        vectors[:, self.unused_tokens] = 0.0
        return vectors

    @torch.no_grad()
    def compute_score(
        self,
        sentence_pairs: Sequence[Sequence[str]],
        max_query_length: int = 512,
        max_passage_length: int = 512,
        weights_for_different_modes: Sequence[float] | None = None,
        batch_size: int = 4,
    ) -> dict[str, list[float]]:
        """The five compute_score lists; also 'colbert_batched', FlagEmbedding's batched maxsim
        (padded passage rows take part in the max as zeros), for information only."""
        w = [1.0, 1.0, 1.0] if weights_for_different_modes is None else weights_for_different_modes
        result: dict[str, list[float]] = {m: [] for m in (*SCORE_MODES, "colbert_batched")}
        for start in range(0, len(sentence_pairs), batch_size):
            pairs = sentence_pairs[start : start + batch_size]
            q = self.forward([p[0] for p in pairs], max_query_length)
            p = self.forward([p[1] for p in pairs], max_passage_length)
            dense = (q["dense"] * p["dense"]).sum(-1)
            sparse = (self.sparse_vocab_vectors(q) * self.sparse_vocab_vectors(p)).sum(-1)
            colbert = []
            for row in range(len(pairs)):
                nq = int(q["attention_mask"][row].sum()) - 1
                npas = int(p["attention_mask"][row].sum()) - 1
                sim = q["colbert"][row, :nq] @ p["colbert"][row, :npas].T
                colbert.append(float(sim.max(dim=1).values.sum() / nq))
            token_scores = torch.einsum("qin,pjn->qipj", q["colbert"], p["colbert"])
            batched = token_scores.max(-1).values.sum(1)
            batched = batched / q["attention_mask"][:, 1:].sum(-1, keepdim=True)
            colbert_t = torch.tensor(colbert)
            result["dense"] += dense.tolist()
            result["sparse"] += sparse.tolist()
            result["colbert"] += colbert
            result["colbert_batched"] += torch.diagonal(batched).tolist()
            result["sparse+dense"] += ((w[0] * dense + w[1] * sparse) / (w[0] + w[1])).tolist()
            result["colbert+sparse+dense"] += (
                (w[0] * dense + w[1] * sparse + w[2] * colbert_t) / (w[0] + w[1] + w[2])
            ).tolist()
        return result


def sentencepiece_ids(model_dir: str | Path, text: str, max_length: int) -> list[int]:
    """XLM-R ids straight from the sentencepiece model (fairseq offset: spm unk 0 -> 3, other
    ids + 1; <mask> = spm size + 1, taking the whitespace before it), as <s> pieces </s>,
    truncated keeping </s>: independent of transformers."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(model_dir) / "sentencepiece.bpe.model"))
    mask_id = sp.get_piece_size() + 1
    segments = text.split("<mask>")
    pieces: list[int] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        pieces += [3 if i == 0 else i + 1 for i in sp.encode(segment if last else segment.rstrip())]
        if not last:
            pieces.append(mask_id)
    return [0, *pieces[: max_length - 2], 2]
