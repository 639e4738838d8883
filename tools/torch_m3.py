"""The PyTorch side of tools/benchmark_encode.py and tools/benchmark_train.py: FlagEmbedding's
M3 encode and unified training step in fp32, on transformers' `XLMRobertaModel` plus nn.Linear
heads holding an m3_jax params tree.

Training computes the unified M3 loss as FlagEmbedding's `EncoderOnlyEmbedderM3Model` does: dense,
sparse, colbert and ensemble InfoNCE over in-batch negatives (or `m3_kd_loss` with teacher
scores), self-distillation from the ensemble, L_final = (L + L') / 2. Sparse scores use
scatter_reduce 'amax' vocab vectors; colbert uses the batched einsum maxsim, where padded passage
rows are zero vectors. Then loss.backward(), clip_grad_norm_ and torch.optim.AdamW.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import XLMRobertaConfig, XLMRobertaModel

from m3_jax.config import LossConfig, ModelConfig, OptimConfig
from m3_jax.convert.to_torch import ENCODER, torch_state_dicts
from m3_jax.inference import lexical_weights
from m3_jax.model import Params

TorchBatch = dict[str, torch.Tensor]


def torch_m3(config: ModelConfig, params: Params, attention: str = "sdpa"):
    """(encoder, colbert_linear, sparse_linear) with m3_jax's `params`, fp32, in eval mode (no
    dropout; gradients still flow). `attention`: transformers' 'eager' or 'sdpa'."""
    state = torch_state_dicts(config, params)
    hf_config = XLMRobertaConfig(**config.to_hf_config(), attn_implementation=attention)
    model = XLMRobertaModel(hf_config, add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state[ENCODER].items()}, strict=True)
    heads = {}
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        w = torch.from_numpy(state[name]["weight"])
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({k: torch.from_numpy(v) for k, v in state[name].items()})
        heads[name] = linear
    return model.eval(), heads["colbert_linear.pt"], heads["sparse_linear.pt"]


# Encode ----------------------------------------------------------------------------------------


def torch_encode(model, colbert_linear, sparse_linear, tokenizer, texts, batch_size, max_length):
    """FlagEmbedding-style: sort by length (longest first), pad each batch to its longest."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(x) for x in encoded], kind="stable")
    dense = np.zeros((len(texts), model.config.hidden_size), np.float32)
    lexical, colbert = [None] * len(texts), [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            d = F.normalize(hidden[:, 0], dim=-1)
            s = torch.relu(sparse_linear(hidden)).squeeze(-1)
            c = colbert_linear(hidden[:, 1:]) * batch["attention_mask"][:, 1:, None]
            c = F.normalize(c, dim=-1)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                dense[i] = d[row].numpy()
                ids = batch["input_ids"][row, :n].numpy()
                w = s[row, :n].numpy() * ~np.isin(ids, [0, 1, 2, 3])
                lexical[i] = lexical_weights(ids, w)
                colbert[i] = c[row, : n - 1].numpy()
    return dense, lexical, colbert


# Training --------------------------------------------------------------------------------------


def m3_representations(model, colbert_linear, sparse_linear, ids, mask, keep_vocab):
    """(dense [N, E], sparse vocab vectors [N, V], colbert [N, L-1, D]), normalised like M3."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    dense = F.normalize(hidden[:, 0], dim=-1)
    weights = torch.relu(sparse_linear(hidden)).squeeze(-1)
    sparse = torch.zeros(ids.shape[0], keep_vocab.shape[0], dtype=weights.dtype)
    sparse = sparse.scatter_reduce(-1, ids, weights, reduce="amax", include_self=True)
    sparse = sparse * keep_vocab  # zeroes cls/eos/pad/unk (FlagEmbedding: `[:, unused] *= 0`)
    colbert = F.normalize(colbert_linear(hidden[:, 1:]) * mask[:, 1:, None], dim=-1)
    return dense, sparse, colbert


def m3_kd_loss(scores, teacher_probs, group_size):
    """FlagEmbedding's `_compute_m3_kd_loss`: teacher-weighted CE over group members, masking
    each row's earlier members with the dtype minimum."""
    targets = torch.arange(scores.shape[0]) * group_size
    mask = torch.zeros_like(scores)
    loss = 0.0
    for i in range(group_size):
        ce = F.cross_entropy(scores + mask, targets + i, reduction="none")
        loss = loss + torch.mean(teacher_probs[:, i] * ce)
        mask = mask.scatter(-1, (targets + i)[:, None], torch.finfo(scores.dtype).min)
    return loss


def m3_loss(q, p, q_mask, config: LossConfig, teacher_scores=None):
    """The unified M3 loss with self-distillation over local in-batch negatives."""
    (q_dense, q_sparse, q_colbert), (p_dense, p_sparse, p_colbert) = q, p
    tau, group_size = config.temperature, p_dense.shape[0] // q_dense.shape[0]
    dense = q_dense @ p_dense.T / tau
    sparse = q_sparse @ p_sparse.T / tau
    maxsim = torch.einsum("qin,pjn->qipj", q_colbert, p_colbert).max(-1).values.sum(1)
    colbert = maxsim / q_mask[:, 1:].sum(-1, keepdim=True) / tau
    w_dense, w_sparse, w_colbert = config.ensemble_weights
    ensemble = w_dense * dense + w_sparse * sparse + w_colbert * colbert

    if teacher_scores is None:
        targets = torch.arange(dense.shape[0]) * group_size
        head_loss = lambda s: F.cross_entropy(s, targets)  # noqa: E731
    else:
        teacher_probs = torch.softmax(teacher_scores, dim=-1)
        head_loss = lambda s: m3_kd_loss(s, teacher_probs, group_size)  # noqa: E731
    l_dense, l_sparse, l_colbert = config.loss_weights
    loss = (
        l_dense * head_loss(dense)
        + head_loss(ensemble)
        + l_sparse * head_loss(sparse)
        + l_colbert * head_loss(colbert)
    ) / 4
    if not config.self_distill:
        return loss
    self_teacher = torch.softmax(ensemble.detach(), dim=-1)

    def distill(s):  # FlagEmbedding's distill_loss("kl_div", ...): soft-target cross-entropy
        return -torch.mean(torch.sum(torch.log_softmax(s, dim=-1) * self_teacher, dim=-1))

    distill_loss = (
        l_dense * distill(dense) + l_sparse * distill(sparse) + l_colbert * distill(colbert)
    ) / 3
    return (loss + distill_loss) / 2


def make_train_step(
    model,
    colbert_linear,
    sparse_linear,
    special_token_ids: tuple[int, ...],
    loss_config: LossConfig,
    optim_config: OptimConfig,
    total_steps: int,
) -> Callable[[TorchBatch], float]:
    """step(batch) -> loss before the update: forward, backward, clip, AdamW (no decay on biases
    and LayerNorm, as HF Trainer), linear decay of the learning rate to 0 at `total_steps`."""
    modules = {"encoder": model, "colbert": colbert_linear, "sparse": sparse_linear}
    named = [(f"{m}.{n}", p) for m, module in modules.items() for n, p in module.named_parameters()]
    params = [p for _, p in named]
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim_config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim_config.lr,
        betas=(optim_config.b1, optim_config.b2),
        eps=optim_config.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
    )
    keep_vocab = torch.ones(model.config.vocab_size)
    keep_vocab[list(special_token_ids)] = 0.0

    def step(batch: TorchBatch) -> float:
        def encode(ids, mask):
            return m3_representations(model, colbert_linear, sparse_linear, ids, mask, keep_vocab)

        q = encode(batch["query_ids"], batch["query_mask"])
        p = encode(batch["passage_ids"], batch["passage_mask"])
        loss = m3_loss(q, p, batch["query_mask"], loss_config, batch.get("teacher_scores"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim_config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, optim_config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step
