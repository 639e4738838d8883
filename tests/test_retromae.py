"""The RetroMAE objective (m3_jax.retromae, m3_jax.model.retromae) against an independent PyTorch
implementation of the reference's formulas, written here: transformers' XLMRobertaForMaskedLM
for the encoder, its embeddings and its tied MLM head, and FlagEmbedding's enhanced decoding
(`RetroMAEForPretraining.forward` with `BertLayerForDecoder`) written out with explicit matmuls,
fed the [B, L, L] decoder attention matrices that the reference collator makes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402
from torch_reference import randomize_, xlmr_config  # noqa: E402

from m3_jax.config import ModelConfig  # noqa: E402
from m3_jax.convert.from_torch import params_from_state  # noqa: E402
from m3_jax.convert.layout import (  # noqa: E402
    encoder_mappings,
    layer_mappings,
    mlm_head_mappings,
)
from m3_jax.model import RetroMAEModel, graphdef  # noqa: E402
from m3_jax.retromae import IGNORE_LABEL, retromae_loss  # noqa: E402

VOCAB = 97
MASK_ID = 96
GEOMETRY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=34,
)
LENGTHS = (12, 9, 5)  # real tokens per text, padded to 12
NUM_MASKS = 4
MAX_PREDICTIONS = 4

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def torch_models(seed: int = 0):
    from transformers import XLMRobertaForMaskedLM
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

    config = xlmr_config(VOCAB, **GEOMETRY)
    config.attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    lm = XLMRobertaForMaskedLM(config)
    randomize_(lm, generator)
    lm.tie_weights()
    c_head = XLMRobertaLayer(config)  # only for its tensors: the forward is written below
    randomize_(c_head, generator)
    return lm.eval(), c_head.eval()


def explicit_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Texts, an encoder masking and decoder masks chosen here (not by the sampler)."""
    rng = np.random.default_rng(seed)
    batch, length = len(LENGTHS), max(LENGTHS)
    ids = np.full((batch, length), 1, np.int64)
    enc_ids = ids.copy()
    labels = np.full((batch, length), IGNORE_LABEL, np.int64)
    for b, n in enumerate(LENGTHS):
        ids[b, :n] = [0, *rng.integers(4, MASK_ID, n - 2), 2]
        enc_ids[b] = ids[b]
        masked = rng.choice(np.arange(1, n - 1), size=min(MAX_PREDICTIONS, n - 2), replace=False)
        labels[b, masked] = ids[b, masked]
        enc_ids[b, masked[:-1]] = MASK_ID  # 80/10/10: most become <mask>,
        enc_ids[b, masked[-1]] = 5  # one a random token (and none kept, here)
    mask_set = rng.random((batch, NUM_MASKS, length)) < 0.5
    choice = rng.integers(0, NUM_MASKS, (batch, length))
    return dict(
        input_ids=ids,
        attention_mask=(ids != 1).astype(np.int64),
        encoder_input_ids=enc_ids,
        encoder_labels=labels,
        decoder_mask_set=mask_set,
        decoder_mask_choice=choice,
    )


def reference_matrix(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The reference collator's decoder attention: row i of a text of n tokens is 1 − (its drawn
    mask with position i set), zero-padded to [L, L]."""
    out = np.zeros(batch["decoder_mask_choice"].shape + batch["decoder_mask_choice"].shape[-1:])
    for b, n in enumerate(LENGTHS):
        for i in range(n):
            row = batch["decoder_mask_set"][b, batch["decoder_mask_choice"][b, i], :n].astype(int)
            row[i] = 1
            out[b, i, :n] = 1 - row
    return out


def torch_retromae_loss(lm, c_head, batch):
    """FlagEmbedding's forward, with BertLayerForDecoder's attention written out."""
    t = {k: torch.tensor(v) for k, v in batch.items()}
    out = lm(
        t["encoder_input_ids"],
        t["attention_mask"],
        labels=t["encoder_labels"],
        output_hidden_states=True,
    )
    cls = out.hidden_states[-1][:, :1]
    embeddings = lm.roberta.embeddings
    hiddens = torch.cat([cls, embeddings(input_ids=t["input_ids"])[:, 1:]], dim=1)
    query = embeddings(inputs_embeds=cls.expand(hiddens.shape))
    matrix = torch.tensor(reference_matrix(batch), dtype=torch.float32)
    bias = (1.0 - matrix[:, None]) * torch.finfo(torch.float32).min

    attention = c_head.attention
    heads, size = GEOMETRY["num_attention_heads"], GEOMETRY["hidden_size"]
    head_dim = size // heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    q = split(attention.self.query(query))
    k = split(attention.self.key(hiddens))
    v = split(attention.self.value(hiddens))
    probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5 + bias, dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(query.shape)
    attended = attention.output.LayerNorm(attention.output.dense(context) + query)
    inner = torch.nn.functional.gelu(c_head.intermediate.dense(attended))
    decoded = c_head.output.LayerNorm(c_head.output.dense(inner) + attended)

    labels = t["input_ids"].clone()
    for b, n in enumerate(LENGTHS):
        labels[b, 0] = labels[b, n - 1] = IGNORE_LABEL
        labels[b, n:] = IGNORE_LABEL
    logits = lm.lm_head(decoded)
    decoder_loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))
    return out.loss, decoder_loss


def to_params(lm, c_head, config: ModelConfig, tensors: dict) -> dict:
    """Our params tree (or gradients tree) of the torch tensors named like `lm` and `c_head`."""
    mappings = [
        *encoder_mappings(config, "roberta."),
        *mlm_head_mappings(config, path=("lm_head",)),
        *layer_mappings(config, "c_head.", ("decoder",)),
    ]
    names = {m.torch_name for m in mappings}
    state = {k: v.detach().numpy().astype(np.float32) for k, v in tensors.items() if k in names}
    return params_from_state(state, mappings, "torch", "RetroMAE")


def named_tensors(lm, c_head, grad: bool) -> dict:
    tensors = {}
    for prefix, module in (("", lm), ("c_head.", c_head)):
        for name, param in module.named_parameters(remove_duplicate=False):
            tensors[prefix + name] = param.grad if grad else param
    return tensors


def test_loss_and_gradients_match_the_reference():
    lm, c_head = torch_models()
    batch = explicit_batch()
    encoder_loss, decoder_loss = torch_retromae_loss(lm, c_head, batch)
    (encoder_loss + decoder_loss).backward()

    config = ModelConfig.from_hf_config(lm.config.to_dict(), attention_chunk_size=5)
    params = to_params(lm, c_head, config, named_tensors(lm, c_head, grad=False))
    expected_grads = to_params(lm, c_head, config, named_tensors(lm, c_head, grad=True))
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model_def = graphdef(config, RetroMAEModel)

    def loss(p):
        model = nnx.merge(model_def, p)
        return retromae_loss(model, jax_batch, max_predictions=MAX_PREDICTIONS, chunk_tokens=7)

    (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(float(parts["encoder"]), encoder_loss.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(parts["decoder"]), decoder_loss.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(value), (encoder_loss + decoder_loss).item(), rtol=1e-5)

    got = dict(jax.tree_util.tree_leaves_with_path(grads))
    want = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    assert got.keys() == want.keys()
    for path in want:
        # Key biases have no gradient (softmax ignores a per-query constant): both sides hold
        # rounding noise of 1e-8, so the tolerance never drops below 1e-6.
        scale = max(float(np.abs(want[path]).max()), 0.1)
        np.testing.assert_allclose(
            np.asarray(got[path]), want[path], atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
        )
