"""How far apart two models' attention is: per-head KL divergence (the Q-BERT paper's Fig. 4).

For every layer l and head h, ``KL(P_A || P_B)`` between the attention distributions of model A
(say fp32) and model B (say 2-bit) over the keys of each query token, averaged over the real
(non-padding) query tokens of the data. Both models see the same inputs; they must share the
tokenizer and the layer/head counts. The result is a ``[layers, heads]`` array.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from qbert_edge.errors import QbertEdgeError

_EPS = 1e-10


def _attentions(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_attentions=True)
    if not out.attentions:
        raise QbertEdgeError("the model returned no attention maps")
    return out.attentions


@torch.no_grad()
def attention_kl(model_a, model_b, batches: Iterable[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Mean per-head ``KL(A || B)`` of the attention distributions, shape ``[layers, heads]``."""
    for m in (model_a, model_b):
        m.eval()
        if hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation("eager")  # sdpa does not return attention maps
    total: torch.Tensor | None = None
    count = 0
    for batch in batches:
        att_a, att_b = _attentions(model_a, batch), _attentions(model_b, batch)
        if len(att_a) != len(att_b) or att_a[0].shape != att_b[0].shape:
            raise QbertEdgeError(
                f"the models differ in shape: {len(att_a)} layers x {att_a[0].shape[1]} heads vs "
                f"{len(att_b)} x {att_b[0].shape[1]}"
            )
        mask = batch["attention_mask"].bool()  # [batch, seq]; real query tokens
        per_layer = []
        for p, q in zip(att_a, att_b):  # [batch, heads, query, key]
            kl = (p * (torch.log(p + _EPS) - torch.log(q + _EPS))).sum(-1)  # [batch, heads, query]
            per_layer.append((kl * mask[:, None, :]).sum(dim=(0, 2)))  # [heads]
        layer_sums = torch.stack(per_layer)
        total = layer_sums if total is None else total + layer_sums
        count += int(mask.sum())
    if total is None or count == 0:
        raise QbertEdgeError("no data to compare the models on")
    return (total / count).numpy()


def plot_attention_kl(kl: np.ndarray, path, title: str) -> None:
    """A heat map of ``kl`` (layers x heads) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbert_edge.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * kl.shape[1], 1.0 + 0.45 * kl.shape[0]))
    im = ax.imshow(kl, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(kl.shape[1]))
    ax.set_yticks(range(kl.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="KL divergence")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
