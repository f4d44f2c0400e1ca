"""VSAETopK's k-sparse training step (``kernel="sparse"``): the same loss as the dense reference step
(``VSAETopKTrainer.dense_step``), from the same selection (``VSAETopKTrainer.select_latents``), with the
decoder and the gradients touching only the k selected latents per token (kernels in ``sparse_topk``).

It implements every VSAETopK setting except ``weights_dtype="bfloat16"`` (its CSR kernels run in float32):
``VSAETopKConfig`` refuses that with kernel="sparse", and kernel="auto" takes the dense step for it
(``vsae_topk.sparse_unsupported``). ``center_input=False`` is done here: the encoder reads x itself and b_dec
gets no gradient through the encoder.
"""

from __future__ import annotations

import math

import torch

from .auxk import auxk_select, normalized_aux_mse
from .errors import ConfigError
from .sparse_topk import TopKCodes, TopKPattern, centered_linear, selected_linear, sparse_decode
from .variational import MEAN_ACTIVATIONS


def sparse_step(trainer, x: torch.Tensor):
    """(loss, x_hat_BD, TopKCodes, loss terms) of one step of ``trainer`` (a ``VSAETopKTrainer``)."""
    ae, cfg = trainer.ae, trainer.cfg
    act = MEAN_ACTIVATIONS[ae.mean_activation]
    dense_kl = cfg.kl_scope == "all"
    if ae.encoder.weight.dtype != torch.float32:  # e.g. a dictionary cast after the config was checked
        raise ConfigError(f"the sparse step implements float32 weights only, not {ae.encoder.weight.dtype}; "
                          "use kernel='dense'")
    # The encoder's input shift: b_dec (with its gradient through x - b_dec), or, with center_input=False,
    # none (a detached 0 contribution: x - 0, and no gradient to b_dec from the encoder).
    b_dec_in = ae.b_dec if ae.center_input else torch.zeros_like(ae.b_dec)
    with torch.no_grad():
        xc_BD = x - b_dec_in
    # Dense encoder forward (needed to rank); with a gradient only when the KL covers every latent.
    if dense_kl:
        mu_BF = act(centered_linear(xc_BD, ae.encoder, b_dec_in))
    else:
        with torch.no_grad():
            pre_BF = ae.encoder(xc_BD)
            # In place: no second (B, F) buffer. Gathering act(pre) instead of pre below is
            # exact, since act(act(p)) == act(p) and relu's backward reads its output.
            mu_BF = pre_BF.relu_() if ae.mean_activation == "relu" else act(pre_BF)

    lo, hi = ae.log_var_bounds.tolist()
    selecting_on_sample = cfg.select_on == "sample" and cfg.sampling
    lv_BF = None  # log sigma^2 over every latent, only where something needs it
    if not ae.learned_var:
        # As the dense step's full_like(mu, 2 log sigma), as a 0-dim tensor of mu's dtype (no (B, F) constant).
        lv_fixed = torch.full((), 2.0 * math.log(ae.sigma.item()), dtype=mu_BF.dtype, device=x.device)
    elif dense_kl:
        lv_BF = centered_linear(xc_BD, ae.log_var_head, b_dec_in).clamp(lo, hi)
    elif selecting_on_sample:
        with torch.no_grad():
            lv_BF = ae.log_var_head(xc_BD).clamp(lo, hi)

    idx_BK, eps_BK = trainer.select_latents(mu_BF, lv_BF if ae.learned_var else lv_fixed)

    # Values at the selected latents, with k-sparse gradients (dense ones if the KL is dense).
    pattern = TopKPattern(idx_BK, cfg.dict_size)  # shared by the decoder's and encoder's backward
    if dense_kl:
        mu_BK = mu_BF.gather(-1, idx_BK)
    else:
        mu_BK = act(selected_linear(xc_BD, ae.encoder, b_dec_in, pattern, mu_BF.gather(-1, idx_BK)))
    if not ae.learned_var:
        lv_BK = lv_fixed
    elif lv_BF is not None and lv_BF.requires_grad:
        lv_BK = lv_BF.gather(-1, idx_BK)
    else:
        pre_lv_BK = None if lv_BF is None else lv_BF.gather(-1, idx_BK)
        lv_BK = selected_linear(xc_BD, ae.log_var_head, b_dec_in, pattern, pre_lv_BK).clamp(lo, hi)
    vals_BK = trainer.sampled_values(mu_BK, lv_BK, eps_BK)

    x_hat_BD = sparse_decode(vals_BK, pattern, ae.decoder.weight) + ae.b_dec
    if dense_kl:
        kl_terms = (mu_BF, lv_BF if ae.learned_var else lv_fixed)
    else:
        kl_terms = (mu_BK, lv_BK)

    def aux_fn(residual_BD):
        # The dead mask is needed only here, and the dense masked top-k only if a latent is dead.
        idx_aux_BK = auxk_select(mu_BF.detach(), trainer.activity.dead_mask(), trainer.k_aux)
        if idx_aux_BK is None:
            return torch.zeros((), dtype=torch.float32, device=x.device)
        aux_pattern = TopKPattern(idx_aux_BK, cfg.dict_size)
        if dense_kl:
            mu_aux_BK = mu_BF.gather(-1, idx_aux_BK)
        else:
            pre_aux_BK = mu_BF.gather(-1, idx_aux_BK)  # act(act(p)) == act(p), see above
            mu_aux_BK = act(selected_linear(xc_BD, ae.encoder, b_dec_in, aux_pattern, pre_aux_BK))
        return normalized_aux_mse(residual_BD, sparse_decode(mu_aux_BK, aux_pattern, ae.decoder.weight))

    loss, terms = trainer.finish_loss(x, x_hat_BD, kl_terms, None if dense_kl else idx_BK, aux_fn)
    return loss, x_hat_BD, TopKCodes(idx_BK, vals_BK, cfg.dict_size), terms
