"""The post's global latent map: t-SNE of the active latents' decoder directions, KMeans
clusters, and four panels (clusters; utilisation; mean activation sized by utilisation;
per-cluster size and utilisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE

from .cosine import decoder_directions
from .figures import plt, save_figure


def too_few_latents(n_alive: int, n_clusters: int) -> str | None:
    """Why no map can be drawn (t-SNE and KMeans need a handful of points per cluster), or None."""
    if n_alive < max(n_clusters, 5):
        return f"only {n_alive} alive latents: too few for a latent map with {n_clusters} clusters"
    return None


def latent_map(W_dec_FD: torch.Tensor, stats: dict[str, Any], n_clusters: int, seed: int) -> dict[str, Any]:
    """2-D embedding and cluster labels of the alive latents (KMeans on the unit directions themselves,
    so clusters do not depend on t-SNE's distortions)."""
    alive_F = stats["alive_F"].cpu()
    d_AD = decoder_directions(W_dec_FD)[alive_F].numpy()
    reason = too_few_latents(d_AD.shape[0], n_clusters)
    if reason:
        raise ValueError(reason)
    n = d_AD.shape[0]
    xy = TSNE(n_components=2, metric="cosine", init="pca", perplexity=min(30.0, (n - 1) / 3),
              random_state=seed).fit_transform(d_AD)
    labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(d_AD)
    util_A = stats["utilisation_F"][alive_F].numpy()
    mean_act_A = stats["mean_activation_F"][alive_F].numpy()
    clusters = [
        {"cluster": c, "size": int((labels == c).sum()), "mean_utilisation": float(util_A[labels == c].mean())}
        for c in range(n_clusters)
    ]
    return {"xy": xy, "labels": labels, "utilisation": util_A, "mean_activation": mean_act_A, "clusters": clusters}


def plot_latent_map(m: dict[str, Any], title: str, path: str | Path) -> Path:
    xy, labels = m["xy"], m["labels"]
    util = np.maximum(m["utilisation"], 1e-6)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    (a, b), (c, d) = axes
    sc = a.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=6)
    a.set_title("KMeans clusters of decoder directions")
    # Beside the axes, not over the points.
    a.legend(*sc.legend_elements(), title="cluster", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
             title_fontsize=7)
    sc = b.scatter(xy[:, 0], xy[:, 1], c=np.log10(util), cmap="viridis", s=6)
    b.set_title("Utilisation rate (fraction of tokens firing)")
    fig.colorbar(sc, ax=b, label="log10 utilisation")
    size_of = lambda u: 4 + 200 * u / util.max()  # noqa: E731
    sc = c.scatter(xy[:, 0], xy[:, 1], c=m["mean_activation"], cmap="magma", s=size_of(util), alpha=0.7)
    c.set_title("Mean |activation| when firing (size = utilisation)")
    fig.colorbar(sc, ax=c, label="mean |activation|")
    # A size key: three utilisation levels drawn at the sizes they get in the panel.
    levels = np.unique(np.quantile(util, [0.1, 0.5, 1.0]))
    handles = [c.scatter([], [], s=size_of(u), color="grey", alpha=0.6) for u in levels]
    c.legend(handles, [f"{u:.2%}" for u in levels], title="utilisation", loc="upper left", bbox_to_anchor=(1.25, 1.0),
             fontsize=7, title_fontsize=7, frameon=False)
    for ax in (a, b, c):
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    clusters = m["clusters"]
    ids = [str(cl["cluster"]) for cl in clusters]
    d.bar(ids, [cl["size"] for cl in clusters], color="tab:blue", label="latents in cluster")
    d.set_xlabel("cluster")
    d.set_ylabel("latents in cluster", color="tab:blue")
    d2 = d.twinx()
    # Markers only: the clusters are categories, not a sequence to join with a line.
    d2.plot(ids, [cl["mean_utilisation"] for cl in clusters], "o", color="tab:red", label="mean utilisation")
    d2.set_ylabel("mean utilisation (fraction of tokens)", color="tab:red")
    d2.set_ylim(bottom=0)
    d2.grid(False)
    d.set_title("Per-cluster size and mean utilisation")
    handles = d.get_legend_handles_labels()[0] + d2.get_legend_handles_labels()[0]
    d.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle(f"Global latent map: {title} ({len(labels)} alive latents)")
    fig.tight_layout()
    return save_figure(fig, path)
