"""A SAELens copy of a wrapped dictionary: the SAELens architecture, config and weights whose encode
reproduces the dictionary's, checked numerically.

Candidates are tried in order (standard / topk / abstopk / matching_pursuit / jumprelu); one is accepted
only if its encode matches the dictionary's on probe inputs under several parameter sets (the trained
ones, shifted encoder biases, random encoders) and its reconstructions match too. A dictionary none of
them reproduces (e.g. VSAETopK with identity mean activation and value selection: signed codes ranked
by value; MP-SAE with select="abs") raises ``ExportError`` instead of producing a wrong file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors.torch import save as safetensors_save

from dictionary_learning_ext.errors import ExportError

from .wrappers import DictionarySAE, probe_inputs

SAELENS_ARCHITECTURES = ("standard", "topk", "abstopk", "matching_pursuit", "jumprelu")


@dataclass
class SaeLensCopy:
    """What ``sae_lens.SAE.load_from_disk`` reads: ``cfg.json`` and ``sae_weights.safetensors``."""

    cfg: dict
    state_dict: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]


def _saelens_candidates(sae: DictionarySAE, trainer_cfg: dict) -> Iterator[tuple[str, dict, dict]]:
    """(architecture, extra cfg, extra weights) that might express ``sae``; tried in order."""
    yield "standard", {}, {}
    k = getattr(sae.dictionary, "k", None)
    k = int(k) if isinstance(k, torch.Tensor) else trainer_cfg.get("k")
    if isinstance(k, int) and k > 0:
        yield "topk", {"k": k}, {}
        yield "abstopk", {"k": k}, {}
        # k fixed pursuit steps (residual_threshold 0 turns SAELens's early stop off); tied, so no W_enc.
        yield "matching_pursuit", {"residual_threshold": 0.0, "max_iterations": k, "stop_on_duplicate_support": False}, {}
    threshold = getattr(sae.dictionary, "threshold", None)
    if isinstance(threshold, torch.Tensor):
        # relu(pre) * (relu(pre) > t) == pre * (pre > max(t, 0)): SAELens's JumpReLU
        threshold_F = threshold.detach().float().clamp_min(0.0).expand(sae.cfg.d_sae).clone()
        yield "jumprelu", {}, {"threshold": threshold_F}


def _saelens_cfg(sae: DictionarySAE, architecture: str, extra: dict, trainer_cfg: dict) -> dict:
    return {
        "architecture": architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        # False for a dictionary whose encoder reads x itself (center_input=False, e.g. vsae_topk:authors).
        "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "model_name": trainer_cfg["lm_name"],
            "hook_name": sae.cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": trainer_cfg.get("context_size"),
            "dataset_path": None,
            "model_from_pretrained_kwargs": {},
            "training_trainer_class": trainer_cfg["trainer_class"],
        },
    }


def build_saelens(cfg: dict, weights: dict[str, torch.Tensor]):
    from sae_lens import SAE

    model = SAE.from_dict(dict(cfg))
    model.load_state_dict(_own_weights(model, weights))
    return model.eval()


def _own_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``model`` stores (a tied SAELens SAE has no W_enc: it uses W_dec.T)."""
    own = model.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in weights.items() if k in own}


@torch.no_grad()
def _parameter_probes(sae: DictionarySAE, x_ND: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Parameter sets on which the dictionary's encode and a SAELens encode must agree: the trained
    ones, the same with the encoder bias pushed far down (mostly negative pre-activations, which
    separates ReLU/TopK/signed variants) and up, and random ones."""
    gen = torch.Generator().manual_seed(1)
    base = {r: getattr(sae, r).detach().float().cpu() for r in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre_NF = (x_ND.float().cpu() - base["b_dec"]) @ base["W_enc"] + base["b_enc"]
    spread = float(pre_NF.std().clamp_min(1e-3))
    d_in, d_sae = base["W_enc"].shape
    W_enc_random_DF = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5
    return [
        base,
        {**base, "b_enc": base["b_enc"] - 4 * spread},
        {**base, "b_enc": base["b_enc"] + 4 * spread},
        {**base, "W_enc": W_enc_random_DF, "b_enc": torch.randn(d_sae, generator=gen) * spread},
        {**base, "W_enc": W_enc_random_DF, "b_enc": torch.randn(d_sae, generator=gen) * spread - 3 * spread},
    ]


@torch.no_grad()
def to_saelens(sae: DictionarySAE, trainer_cfg: dict) -> SaeLensCopy:
    """The SAELens config + weights that reproduce ``sae`` exactly, or ExportError."""
    sae = sae.to(device="cpu", dtype=torch.float32)
    x_ND = probe_inputs(sae, n=384).float()
    probes = _parameter_probes(sae, x_ND)
    tried = []
    for architecture, extra_cfg, extra_weights in _saelens_candidates(sae, trainer_cfg):
        cfg = _saelens_cfg(sae, architecture, extra_cfg, trainer_cfg)
        tried.append(architecture)
        if not all(_same_encode(sae, cfg, params, extra_weights, x_ND) for params in probes):
            continue
        weights = {r: getattr(sae, r).detach().float().cpu().contiguous() for r in ("W_enc", "b_enc", "W_dec", "b_dec")}
        weights.update(extra_weights)
        check = build_saelens(cfg, weights)
        weights = _own_weights(check, weights)
        if not _close(sae(x_ND), check(x_ND)):
            continue
        # SAELens's own serialisation of the config (adds e.g. metadata.sae_lens_version, which its
        # loader uses to tell the 6.x format from older ones).
        return SaeLensCopy(check.cfg.to_dict(), weights)
    raise ExportError(
        f"{trainer_cfg['trainer_class']} ({type(sae.dictionary).__name__}) with this config has no SAELens "
        f"equivalent: none of the SAELens architectures {tried} reproduces its encode "
        "(e.g. signed codes selected by value, or an identity code activation). Not writing a SAELens copy "
        "that would compute something else; export with --allow-missing-saelens to skip it."
    )


def _same_encode(sae: DictionarySAE, cfg: dict, params: dict[str, torch.Tensor],
                 extra_weights: dict[str, torch.Tensor], x_ND: torch.Tensor) -> bool:
    """Whether the dictionary's encode and SAELens's agree on ``x_ND`` with ``params`` substituted."""
    f_ours_NF = sae.call_dictionary("encode", x_ND, params={r: v.to(sae.W_enc.dtype) for r, v in params.items()})
    f_theirs_NF = build_saelens(cfg, {**params, **extra_weights}).encode(x_ND)
    return f_ours_NF.shape == f_theirs_NF.shape and _close(f_ours_NF, f_theirs_NF)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(ours.abs().max().clamp_min(1)))


def safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state_dict.items()})
