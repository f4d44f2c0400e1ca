"""Scoring a trained dictionary against the synthetic model's ground truth.

* ``EvalSet`` -- the held-out samples: feature activations drawn from the model's own
  ``ActivationGenerator`` under a fixed seed, batch by batch, replayed identically for every SAE (so every
  comparison between SAEs is on the same samples). It offers the ``sample(batch_size)`` method
  ``eval_sae_on_synthetic_data`` reads from an activation generator.
* ``saelens_sae`` -- the adapter: a dictionary of any registered architecture as an object with what SAELens's
  eval reads (``W_dec`` (d_sae, d_in), ``encode``, ``decode``, ``eval()``): the project's SAEBench wrapper
  (``saebench_adapters.wrappers.wrap_dictionary``), which runs the dictionary's own encode/decode.
* ``saelens_metrics`` -- SAELens's ``eval_sae_on_synthetic_data`` itself (explained variance, MCC, uniqueness,
  per-latent precision / recall / F1, L0, dead latents, shrinkage); nothing of it is re-implemented here.
* ``per_feature`` / ``group_summary`` -- which ground-truth features each SAE recovers: the one-to-one
  Hungarian matching of decoder directions to features that SAELens's MCC uses, and, for each matched pair,
  SAELens's ``ClassificationMetricsCalculator`` counts (does the latent fire when its feature does), grouped by
  the ground truth's hierarchy (parents, children) and correlation structure (correlated, independent).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import torch

from dictionary_learning_ext.errors import StudyError

SAELENS_KEYS = ("true_l0", "sae_l0", "dead_latents", "shrinkage", "explained_variance", "mcc", "uniqueness",
                "precision", "recall", "f1", "accuracy")
GROUPS = ("parent", "child", "free", "correlated", "independent", "all")
GROUP_DEFINITIONS = {
    "parent": "a feature with children in the hierarchy (a root or an inner node)",
    "child": "a feature with a parent and no children (a leaf of the hierarchy)",
    "free": "a feature outside every tree",
    "correlated": "the quarter of features with the largest communality |f_i|^2 (share of their copula variance "
                  "from the shared low-rank factors)",
    "independent": "the quarter with the smallest communality",
    "all": "every feature in reach",
}


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


class EvalSet:
    """``n_samples`` feature-activation samples of ``model`` in batches of ``batch_size``, batch i drawn by the
    model's own ``ActivationGenerator`` with torch's RNG seeded to ``seed`` and i (the caller's RNG state is
    left untouched). Kept in memory (sparse) when ``cache``; otherwise redrawn, identically, on each pass."""

    def __init__(self, model: Any, n_samples: int, batch_size: int, seed: int, cache: bool = True):
        if n_samples < 1 or batch_size < 1:
            raise StudyError(f"eval set needs n_samples >= 1 and batch_size >= 1, got {n_samples}, {batch_size}")
        self.model = model
        self.n_samples = n_samples
        self.batch_size = min(batch_size, n_samples)
        self.seed = seed
        self.sizes = [min(self.batch_size, n_samples - start) for start in range(0, n_samples, self.batch_size)]
        self._cached: Optional[list[torch.Tensor]] = None
        self._next = 0
        if cache:
            self._cached = [self._draw(i).to_sparse() for i in range(len(self.sizes))]

    def _draw(self, i: int) -> torch.Tensor:
        generator = self.model.activation_generator
        device = generator.firing_probabilities.device
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(self.seed * 1_000_003 + i)
            return generator.sample(self.sizes[i])

    def feature_batch(self, i: int) -> torch.Tensor:
        """Batch i of ground-truth feature activations (B, F), dense."""
        return self._cached[i].to_dense() if self._cached is not None else self._draw(i)

    # --- the ActivationGenerator interface eval_sae_on_synthetic_data reads -------------------------
    def reset(self) -> None:
        self._next = 0

    def sample(self, batch_size: int) -> torch.Tensor:
        if self._next >= len(self.sizes) or batch_size != self.sizes[self._next]:
            raise StudyError(f"the eval set serves its {len(self.sizes)} batches of {self.batch_size} in order; asked "
                             f"for batch {self._next} with {batch_size} samples (call reset() before each pass)")
        batch = self.feature_batch(self._next)
        self._next += 1
        return batch

    def __call__(self, batch_size: int) -> torch.Tensor:
        return self.sample(batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(feature activations (B, F), hidden activations (B, D)) for every batch, in order."""
        with torch.no_grad():
            for i in range(len(self.sizes)):
                feats_BF = self.feature_batch(i)
                yield feats_BF, self.model.feature_dict(feats_BF)


# --- the adapter --------------------------------------------------------------------------------------
def saelens_sae(dictionary: torch.nn.Module, trainer_cfg: dict[str, Any], device: str = "cpu"):
    """``dictionary`` as what SAELens's synthetic eval reads (W_dec (d_sae, d_in), encode, decode, eval):
    the project's SAEBench wrapper, which runs the dictionary's own encode and decode. Decoder rows that
    are not unit norm are folded into the encoder where that leaves the codes' support and the
    reconstructions unchanged (the firing pattern and the cosines SAELens scores are unaffected); a free
    decoder (``vsae_topk:authors``) is presented as trained."""
    from saebench_adapters.wrappers import wrap_dictionary

    return wrap_dictionary(dictionary, trainer_cfg, device=device).eval()


# --- SAELens's metrics ----------------------------------------------------------------------------------
def saelens_metrics(sae: Any, model: Any, eval_set: EvalSet) -> dict[str, float]:
    """SAELens's ``eval_sae_on_synthetic_data`` on the eval set, flattened (classification metrics at top level,
    F1 as ``f1``)."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    eval_set.reset()
    result = eval_sae_on_synthetic_data(sae, model.feature_dict, eval_set, num_samples=eval_set.n_samples,
                                        batch_size=eval_set.batch_size)
    c = result.classification
    return {"true_l0": result.true_l0, "sae_l0": result.sae_l0, "dead_latents": int(result.dead_latents),
            "shrinkage": result.shrinkage, "explained_variance": result.explained_variance, "mcc": result.mcc,
            "uniqueness": result.uniqueness, "precision": c.precision, "recall": c.recall, "f1": c.f1_score,
            "accuracy": c.accuracy}


# --- per ground-truth feature ----------------------------------------------------------------------------
def hungarian_matching(W_dec_LD: torch.Tensor, gt_FD: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The matching SAELens's MCC makes: |cos| between decoder rows and features (SAELens's
    ``cosine_similarities``), one-to-one by ``scipy.optimize.linear_sum_assignment`` on 1 - |cos|. Returns
    (latent indices, their features, |cos| (L, F))."""
    from scipy.optimize import linear_sum_assignment
    from sae_lens.util import cosine_similarities

    cos_LF = cosine_similarities(W_dec_LD.detach(), gt_FD.detach()).abs().float().cpu()
    rows, cols = linear_sum_assignment(1 - cos_LF.numpy())
    return rows, cols, cos_LF


@torch.no_grad()
def per_feature(sae: Any, model: Any, eval_set: EvalSet) -> dict[str, np.ndarray]:
    """For every ground-truth feature (F,): ``matched`` (a latent is assigned to it by the MCC matching),
    ``cos`` (|cos| with that latent; 0 when unmatched), and, from SAELens's ``ClassificationMetricsCalculator``
    run with the matching as its latent -> feature map, ``recall`` (share of the feature's firings on which its
    latent fires; 0 when unmatched), ``precision`` and ``f1`` of that latent as a detector of the feature, and
    ``fires`` (the feature's firings in the eval set; recall is NaN where it never fires)."""
    from sae_lens.synthetic import ClassificationMetricsCalculator

    gt_FD = model.feature_dict.feature_vectors.detach()
    W_dec_LD = sae.W_dec.detach()
    rows, cols, cos_LF = hungarian_matching(W_dec_LD, gt_FD)
    calc = ClassificationMetricsCalculator(W_dec_LD, gt_FD)
    assigned = torch.zeros(W_dec_LD.shape[0], dtype=torch.bool)
    assigned[torch.as_tensor(rows, dtype=torch.long)] = True
    calc.best_matches = calc.best_matches.clone()
    calc.best_matches[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long).to(
        calc.best_matches.device)
    fires_F = torch.zeros(gt_FD.shape[0])
    for feats_BF, hidden_BD in eval_set.batches():
        calc.add_batch(sae.encode(hidden_BD), feats_BF)
        fires_F += (feats_BF > 0).float().sum(0).cpu()
    F = gt_FD.shape[0]
    matched_F = np.zeros(F, dtype=bool)
    cos_F, recall_F, precision_F, f1_F = (np.zeros(F) for _ in range(4))
    tp, fp, fn = calc.tp.numpy(), calc.fp.numpy(), calc.fn.numpy()
    for latent, feature in zip(rows, cols):
        matched_F[feature] = True
        cos_F[feature] = float(cos_LF[latent, feature])
        recall_F[feature] = tp[latent] / (tp[latent] + fn[latent]) if tp[latent] + fn[latent] > 0 else math.nan
        precision_F[feature] = tp[latent] / (tp[latent] + fp[latent]) if tp[latent] + fp[latent] > 0 else 0.0
        p, r = precision_F[feature], recall_F[feature]
        f1_F[feature] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    never = fires_F.numpy() == 0
    recall_F[never] = math.nan
    f1_F[never] = math.nan
    return {"matched": matched_F, "cos": cos_F, "recall": recall_F, "precision": precision_F, "f1": f1_F,
            "fires": fires_F.numpy()}


def feature_groups(structure: dict[str, torch.Tensor], in_reach: int) -> dict[str, np.ndarray]:
    """Boolean masks (F,) of the ``GROUPS`` among the ``in_reach`` most frequent features (indices
    0..in_reach-1: the Zipf ranks; a width-W SAE cannot cover more than W features)."""
    F = structure["depth"].shape[0]
    reach = np.zeros(F, dtype=bool)
    reach[: min(in_reach, F)] = True
    has_children = structure["has_children"].numpy()
    has_parent = structure["has_parent"].numpy()
    depth = structure["depth"].numpy()
    communality = structure["communality"].numpy()
    groups = {"parent": reach & has_children, "child": reach & has_parent & ~has_children,
              "free": reach & (depth < 0), "all": reach}
    if communality[reach].max(initial=0.0) > 0:
        low, high = np.quantile(communality[reach], [0.25, 0.75])
        groups["correlated"] = reach & (communality >= high)
        groups["independent"] = reach & (communality <= low)
    else:  # no correlation structure: nothing is correlated
        groups["correlated"] = np.zeros(F, dtype=bool)
        groups["independent"] = reach.copy()
    return {name: groups[name] for name in GROUPS}


def group_summary(features: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per group: features, share matched, mean |cos| with the matched latent, mean recall and F1 (over features
    that fire in the eval set; unmatched features count 0)."""

    def mean(values: np.ndarray) -> Optional[float]:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else None

    out = {}
    for name, mask in groups.items():
        out[name] = {"n": int(mask.sum()), "matched": mean(features["matched"][mask].astype(float)),
                     "cos": mean(features["cos"][mask]), "recall": mean(features["recall"][mask]),
                     "f1": mean(features["f1"][mask])}
    return out
