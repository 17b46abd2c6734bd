"""Pictures of the sensitivity: eigenvalue spread per layer (Q-BERT Fig. 1) and a loss landscape (Fig. 2).

:func:`plot_spread` draws, for every analysed layer, the top Hessian eigenvalue of each data
subset, their mean, and Omega = |mean| + std (with the rank by Omega).
:func:`plot_landscape` draws the mean loss over a grid around one layer's weights along its
top two eigenvectors. Both write a PNG (matplotlib, Agg backend, imported only here) whose
metadata names the format (``qbert-edge/sensitivity-plot`` or ``qbert-edge/landscape-plot``,
version 1). They write to the path they are given; the caller makes the write atomic.
"""

from __future__ import annotations

import os

from qbert_edge import __version__
from qbert_edge.sensitivity import Landscape, Sensitivity

PLOT_VERSION = 1


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _metadata(fmt: str, title: str) -> dict:
    return {"Software": f"qbert-edge {__version__}", "Title": title, "Description": f"{fmt} v{PLOT_VERSION}"}


def plot_spread(sens: Sensitivity, path: str | os.PathLike) -> None:
    """PNG: eigenvalue of every subset per layer (dots), mean (bar) and Omega (star, with rank)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(sens.layers) + 2.5), 4.5), dpi=120)
    k = sens.subsets
    for pos, l in enumerate(sens.layers):
        xs = [pos + 0.25 * ((j + 0.5) / k - 0.5) for j in range(k)]
        colors = ["tab:blue" if c else "tab:orange" for c in l.converged]
        ax.scatter(xs, l.eigenvalues, s=18, c=colors, alpha=0.8, zorder=3, label="subset eigenvalue" if pos == 0 else None)
        ax.hlines(l.mean, pos - 0.2, pos + 0.2, colors="black", lw=1.5, zorder=4, label="mean" if pos == 0 else None)
        ax.vlines(pos, l.mean - l.std, l.mean + l.std, colors="gray", lw=1, zorder=2, label="mean ± std" if pos == 0 else None)
        ax.scatter([pos], [l.omega], marker="*", s=140, c="tab:red", zorder=5, label="Ω = |mean| + std" if pos == 0 else None)
        ax.annotate(f"#{sens.rank(l.layer)}", (pos, l.omega), textcoords="offset points", xytext=(7, 4), fontsize=8, color="tab:red")
    if not all(all(l.converged) for l in sens.layers):
        ax.scatter([], [], s=18, c="tab:orange", label="not converged")
    if any(x < 0 for l in sens.layers for x in l.eigenvalues):
        ax.axhline(0.0, color="gray", lw=0.7, ls="--")
    ax.set_xticks(range(len(sens.layers)), [str(l.layer) for l in sens.layers])
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title(f"{sens.model} on {sens.data}: {k} subsets (rank by Ω)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_metadata("qbert-edge/sensitivity-plot", f"sensitivity of {sens.model}"))
    plt.close(fig)


def plot_landscape(land: Landscape, path: str | os.PathLike, model: str = "") -> None:
    """PNG: 3-D loss surface and its contour map along the layer's top two eigenvectors."""
    import numpy as np

    plt = _pyplot()
    a = np.asarray(land.steps)
    z = np.asarray(land.losses)
    A, B = np.meshgrid(a, a, indexing="ij")
    fig = plt.figure(figsize=(10, 4.5), dpi=120)
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.plot_surface(A, B, z, cmap="viridis", linewidth=0, antialiased=True, alpha=0.9)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("ε1 (top eigenvector)", fontsize=8)
    ax.set_ylabel("ε2 (2nd eigenvector)", fontsize=8)
    ax.set_zlabel("loss", fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    cs = ax2.contourf(A, B, z, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax2, label="loss")
    ax2.plot([0], [0], "r+", ms=10)
    ax2.set_xlabel("ε1 (top eigenvector)")
    ax2.set_ylabel("ε2 (2nd eigenvector)")
    l1, l2 = land.eigenvalues
    fig.suptitle(
        f"{model + ': ' if model else ''}layer {land.layer} loss landscape, λ1={l1:.4g}, λ2={l2:.4g} "
        f"({land.examples} examples)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_metadata("qbert-edge/landscape-plot", f"layer {land.layer} landscape"))
    plt.close(fig)
