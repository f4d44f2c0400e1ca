"""Auxiliary-K loss on dead latents (Gao et al. 2024, appendix A.2), as a shared function.

dictionary_learning keeps this as a TopKTrainer method; ours takes the scores and the dead mask
so every TopK-style trainer here can use it.
"""

import torch


def auxk_loss(
    residual_BD: torch.Tensor,
    scores_BF: torch.Tensor,
    dead_F: torch.Tensor,
    decoder_weight_DF: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """Normalised MSE of reconstructing the (detached) residual from the top ``k_aux`` dead latents.

    Only dead latents receive gradient; returns 0 when none is dead. ``scores_BF`` are the codes
    the dead latents would take (e.g. the posterior mean).
    """
    num_dead = int(dead_F.sum())
    if num_dead == 0 or k_aux <= 0:
        return torch.zeros((), dtype=torch.float32, device=residual_BD.device)
    residual_BD = residual_BD.detach().float()
    k = min(k_aux, num_dead)
    masked_BF = torch.where(dead_F[None], scores_BF, torch.full_like(scores_BF, -torch.inf))
    values_BK, indices_BK = masked_BF.topk(k, dim=-1, sorted=False)
    # Gather the chosen dead atoms instead of materialising a dense (B, F) code matrix.
    atoms_BKD = decoder_weight_DF.T[indices_BK]
    recon_BD = torch.einsum("bk,bkd->bd", values_BK.float(), atoms_BKD.float())
    l2 = (residual_BD - recon_BD).square().sum(dim=-1).mean()
    denom = (residual_BD - residual_BD.mean(dim=0, keepdim=True)).square().sum(dim=-1).mean()
    return (l2 / denom.clamp_min(1e-12)).nan_to_num(0.0)
