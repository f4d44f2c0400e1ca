"""Auxiliary-K loss on dead latents (Gao et al. 2024, appendix A.2), as shared functions.

dictionary_learning keeps this as a TopKTrainer method; ours takes the scores and the dead mask
so every TopK-style trainer here can use it. The residual target is detached (as in
dictionary_learning's TopK): auxK moves only the dead latents' encoder rows and decoder atoms.
"""

from typing import Optional

import torch


def auxk_select(scores_BF: torch.Tensor, dead_F: torch.Tensor, k_aux: int) -> Optional[torch.Tensor]:
    """Indices (B, k') of the top ``k' = min(k_aux, #dead)`` dead latents by score; None if none is dead.

    The set is what a top-k over the scores with every live latent masked to -inf selects (up to ties,
    which is how a top-k breaks them), computed on the dead latents' columns only: when at most k_aux
    latents are dead they are all selected (no top-k at all), and when fewer than half are dead the top-k
    runs on their (B, #dead) columns instead of the (B, F) masked copy. (On real activations a few latents
    are dead at a time; the dense masked top-k then cost as much as the rest of a k-sparse step.)
    """
    num_dead = int(dead_F.sum())
    if num_dead == 0 or k_aux <= 0:
        return None
    B, F = scores_BF.shape
    with torch.no_grad():
        if num_dead <= k_aux or 2 * num_dead < F:
            dead_idx = dead_F.nonzero().squeeze(-1)
            if num_dead <= k_aux:
                return dead_idx.expand(B, num_dead).contiguous()
            local_BK = scores_BF.index_select(-1, dead_idx).topk(k_aux, dim=-1, sorted=False).indices
            return dead_idx[local_BK]
        masked_BF = torch.where(dead_F[None], scores_BF, torch.full_like(scores_BF, -torch.inf))
        return masked_BF.topk(min(k_aux, num_dead), dim=-1, sorted=False).indices


def normalized_aux_mse(residual_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    """||residual - recon||^2 over the residual's variance (OpenAI's normalisation), float32."""
    residual_BD = residual_BD.detach().float()
    l2 = (residual_BD - recon_BD.float()).square().sum(dim=-1).mean()
    denom = (residual_BD - residual_BD.mean(dim=0, keepdim=True)).square().sum(dim=-1).mean()
    return (l2 / denom.clamp_min(1e-12)).nan_to_num(0.0)


def auxk_loss(
    residual_BD: torch.Tensor,
    scores_BF: torch.Tensor,
    dead_F: torch.Tensor,
    decoder_weight_DF: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """Normalised MSE of reconstructing the (detached) residual from the top ``k_aux`` dead latents.

    Only dead latents receive gradient; returns 0 when none is dead. ``scores_BF`` are the codes
    the dead latents would take (e.g. the posterior mean). Dense reference: decodes a scattered
    (B, F) code matrix like dictionary_learning's TopK.
    """
    indices_BK = auxk_select(scores_BF, dead_F, k_aux)
    if indices_BK is None:
        return torch.zeros((), dtype=torch.float32, device=residual_BD.device)
    values_BK = scores_BF.gather(-1, indices_BK)
    codes_BF = torch.zeros_like(scores_BF).scatter(-1, indices_BK, values_BK)
    return normalized_aux_mse(residual_BD, codes_BF.float() @ decoder_weight_DF.T.float())
