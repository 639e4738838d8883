"""Tiny tokenizers and models built locally, for tests, demos and offline machines.

The tokenizer is a sentencepiece unigram model (the kind XLM-R ships as `sentencepiece.bpe.model`)
trained on synthetic multi-script text, wrapped as an `XLMRobertaTokenizer`. Random weights are
fan-in scaled with LayerNorm gains near 1 and a positive sparse bias: a flat N(0, 0.02) init gives
near-constant outputs that would hide bugs.

The sparse head is scaled down a further 10x, into the range of BGE-M3's trained head (token
weights of about 0.05-0.3). At the fan-in scale its positive weights average 0.38 and a
query-passage logit (score / the 0.02 training temperature) is about 7 per shared token, with no
relation to relevance: the first sparse loss is far above ln(candidates), the fastest way down is
every weight to 0, where the ReLU is dead and the bilinear score has no gradient, and fine-tuning
the tiny model killed its sparse head within 10 steps (the README's training section has the
ablation).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import jax
import numpy as np

from m3_jax.config import ModelConfig, tiny
from m3_jax.convert.reranker import export_reranker
from m3_jax.model import M3Model, Params, RerankerModel, abstract_params
from m3_jax.model.abstract import ModelClass
from m3_jax.run_dir import save_model_dir
from m3_jax.tokenization import load_tokenizer

SCRIPTS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "абвгдежзийклмнопрстуфхцчшщыэюяБВГДЖЗИКЛМНПРСТ",
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "0123456789.,;:!?-",
)

# See the module docstring: a trained head's weight scale, not the fan-in one.
SPARSE_HEAD_SCALE = 0.1


def synthetic_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Lines of random 'words' in several scripts, some mixing scripts."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        script = rng.choice(SCRIPTS)
        words = []
        for _ in range(rng.randint(3, 20)):
            alphabet = script if rng.random() < 0.9 else rng.choice(SCRIPTS)
            words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))))
        lines.append(" ".join(words))
    return lines


def train_tokenizer(out_dir: str | Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Writes sentencepiece.bpe.model, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json; the tokenizer has `vocab_size + 2` ids (fairseq offset + <mask>)."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(synthetic_corpus(seed=seed)), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "sp"),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            seed_sentencepiece_size=100000,
            minloglevel=2,
        )
        (out / "sentencepiece.bpe.model").write_bytes((Path(tmp) / "sp.model").read_bytes())
    tokenizer = XLMRobertaTokenizer.from_pretrained(str(out))
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(str(out))
    # A minimal config that transformers 4 and 5 both read.
    specials = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 8192, **specials},
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out


def random_params(config: ModelConfig, seed: int = 0, model_class: ModelClass = M3Model) -> Params:
    """Float32 numpy params for `config` whose outputs vary visibly between tokens and texts."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        shape = leaf.shape
        name = names[-1]
        if name == "embedding":
            std = 1.0 if names[-2] == "word_embeddings" else 0.5
            return rng.normal(0.0, std, shape).astype(np.float32)
        head_scale = SPARSE_HEAD_SCALE if names[0] == "sparse_linear" else 1.0
        if name == "kernel":
            is_qkv = len(shape) == 3 and names[-2] in ("query", "key", "value")
            fan_in = shape[0] if is_qkv else int(np.prod(shape[:-1]))
            return (head_scale * rng.normal(0.0, fan_in**-0.5, shape)).astype(np.float32)
        if name == "scale":
            return (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)
        if name == "bias":
            offset = 0.2 if names[0] == "sparse_linear" else 0.0
            return (head_scale * (offset + rng.normal(0.0, 0.1, shape))).astype(np.float32)
        raise ValueError(f"no init rule for parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(init, abstract_params(config, model_class))


def build_tiny_model_dir(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A complete m3_jax model directory (tokenizer + random tiny model) at `out_dir`."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = train_tokenizer(Path(tmp) / "tokenizer", seed=seed)
        config = tiny(vocab_size=len(load_tokenizer(tokenizer_dir)), **config_overrides)
        return save_model_dir(out, config, random_params(config, seed), tokenizer_dir)


def build_tiny_reranker_dir(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A random tiny cross-encoder in the PyTorch layout of XLMRobertaForSequenceClassification
    (what `Reranker.from_pretrained` and transformers both load), with its tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = train_tokenizer(Path(tmp) / "tokenizer", seed=seed)
        config = tiny(vocab_size=len(load_tokenizer(tokenizer_dir)), **config_overrides)
        params = random_params(config, seed, RerankerModel)
        return export_reranker(config, params, out_dir, tokenizer_source=tokenizer_dir)
