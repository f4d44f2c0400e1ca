"""What the digits study measures on held-out images: reconstruction, dictionary coherence, and
reconstruction when a k-sparse dictionary's k is changed at inference."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from dictionary_learning_ext.errors import StudyError


@contextlib.contextmanager
def inference_k(ae: torch.nn.Module, k: Optional[int]) -> Iterator[None]:
    """Temporarily run a k-sparse dictionary with another k (its ``k`` buffer, which encode reads)."""
    if k is None:
        yield
        return
    k_buffer = getattr(ae, "k", None)
    if not isinstance(k_buffer, torch.Tensor):
        raise StudyError(f"{type(ae).__name__} has no k buffer; inference-time k applies to k-sparse dictionaries")
    saved = k_buffer.clone()
    k_buffer.fill_(k)
    try:
        yield
    finally:
        k_buffer.copy_(saved)


@torch.no_grad()
def reconstruction(ae: torch.nn.Module, x_ND: torch.Tensor, k: Optional[int] = None) -> dict[str, Any]:
    """FVE, normalised MSE and L0 over the images, and the codes (``codes``, (N, F))."""
    with inference_k(ae, k):
        f_NF = ae.encode(x_ND)
        x_hat_ND = ae.decode(f_NF)
    sse = (x_ND - x_hat_ND).square().sum()
    return {
        "fve": float(1 - sse / (x_ND - x_ND.mean(0)).square().sum()),
        "nmse": float(sse / x_ND.square().sum()),
        "l0": float((f_NF != 0).sum(-1).float().mean()),
        "codes": f_NF,
    }


def atoms_FD(ae: torch.nn.Module) -> torch.Tensor:
    """Unit-normalised atoms (dictionary_learning's layout: decoder.weight is (D, F))."""
    return F.normalize(ae.decoder.weight.detach().T.float(), dim=-1)


@torch.no_grad()
def coherence(unit_atoms_FD: torch.Tensor, f_NF: torch.Tensor) -> dict[str, Any]:
    """|cos| between distinct atoms: over all atoms, over atoms used on >= 1 test image, each used atom's
    nearest used neighbour, and over pairs of atoms active on the same image (pair-weighted mean)."""
    cos_FF = (unit_atoms_FD @ unit_atoms_FD.T).abs().fill_diagonal_(0.0)
    off_FF = ~torch.eye(unit_atoms_FD.shape[0], dtype=torch.bool)
    used_F = (f_NF != 0).any(0)
    used_off_FF = off_FF & used_F[:, None] & used_F[None, :]
    active_NF = (f_NF != 0).float()
    n_active_N = active_NF.sum(-1)
    pair_sum = ((active_NF @ cos_FF) * active_NF).sum()
    pair_count = (n_active_N * (n_active_N - 1)).sum()
    used_cos_UU = cos_FF[used_F][:, used_F]
    return {
        "coherence_mean": float(cos_FF[off_FF].mean()),
        "coherence_max": float(cos_FF[off_FF].max()),
        # None (JSON null) when fewer than two atoms are used / active together: nothing to compare.
        "coherence_used_mean": float(cos_FF[used_off_FF].mean()) if used_off_FF.any() else None,
        "coherence_used_max": float(cos_FF[used_off_FF].max()) if used_off_FF.any() else None,
        "coherence_nn_used_mean": float(used_cos_UU.max(dim=1).values.mean()) if used_F.sum() > 1 else None,
        "coactive_coherence": float(pair_sum / pair_count) if pair_count > 0 else None,
        "n_used": int(used_F.sum()),
        "frac_used": float(used_F.float().mean()),
    }


def measure(ae: torch.nn.Module, x_test_ND: torch.Tensor) -> dict[str, Any]:
    """One results row's numbers: reconstruction and coherence on the test images."""
    rec = reconstruction(ae, x_test_ND)
    return {"l0": rec["l0"], "fve": rec["fve"], "nmse": rec["nmse"], **coherence(atoms_FD(ae), rec["codes"])}


def inference_k_curves(models: dict[str, torch.nn.Module], matched: list[dict], x_test_ND: torch.Tensor,
                       inference_ks: Sequence[int]) -> dict[str, Any]:
    """FVE of each k-sparse matched run when its k is changed at inference (trained at matched_k)."""
    curves = {}
    for r in matched:
        if r["k"] is None:
            continue
        curve = [reconstruction(models[r["run"]], x_test_ND, k=k) for k in inference_ks]
        fve = [c["fve"] for c in curve]
        curves[r["architecture"]] = {
            "trained_k": r["k"], "k": list(inference_ks), "fve": fve, "nmse": [c["nmse"] for c in curve],
            "l0": [c["l0"] for c in curve],
            # MP-SAE's residual can only shrink with more pursuit steps; TopK-style encoders need not.
            "monotone": all(b >= a - 1e-6 for a, b in zip(fve, fve[1:])),
        }
    return curves
