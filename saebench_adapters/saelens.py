"""A SAELens copy of a wrapped dictionary: the SAELens architecture, config and weights whose encode
reproduces the dictionary's, checked numerically.

Which SAELens architecture. Where the dictionary's class declares its inference rule (``DECLARED_RULES``:
dictionary_learning's ``AutoEncoder`` is ReLU -> ``standard``, ``AutoEncoderTopK`` -> ``topk``,
``BatchTopKSAE`` at inference a threshold -> ``jumprelu``; VSAETopK by its ``mean_activation`` /
``select_by``; VSAE by its code activation; MP-SAE by its selection), that rule decides it, and a rule
with no SAELens form (e.g. signed codes ranked by value, MP-SAE with ``select="abs"``) is refused at once.
A dictionary whose class declares nothing (a new architecture) is matched by trying the candidates in
order (standard / topk / abstopk / matching_pursuit / jumprelu).

The numeric check. The chosen architecture must reproduce the dictionary's codes and reconstructions on
probe inputs under several parameter sets (the trained ones, shifted encoder biases, random encoders).
Two float32 evaluations of the same pre-activations (the dictionary's ``nn.Linear`` and SAELens's
``x @ W_enc``) round differently, so two latents whose pre-activations lie within that rounding of each
other (a near tie at the k-th place of a top-k, at a JumpReLU threshold, or at ReLU's 0) may be selected
differently by the two. The comparison allows exactly that: codes must agree within a tolerance except
for latents that switch on/off at such a near tie (``|pre - boundary| <= eps``, eps the rounding bound of
the pre-activation; at a top-k's k-th place such switches must pair up as swaps, so a different k is not
mistaken for ties); reconstructions must agree up to what the codes' differences explain. A wrong
architecture differs away from every boundary and is refused. Matching pursuit is compared exactly (a tie changes every later pursuit step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union

import torch
from safetensors.torch import save as safetensors_save

from dictionary_learning_ext.errors import ExportError

from .wrappers import DictionarySAE, TiedDictionarySAE, probe_inputs

SAELENS_ARCHITECTURES = ("standard", "topk", "abstopk", "matching_pursuit", "jumprelu")
Boundary = Literal["relu", "topk", "abstopk", "threshold", "exact"]
"""Where a latent switches on or off under an inference rule (what a near tie is measured against)."""

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
TIE_ULPS = 32
"""A near tie: two pre-activations within TIE_ULPS float32 units of roundoff of their magnitude
(sum |x_i w_i| + |b|) of each other, or of the boundary (see ``PreActivations``)."""
VALUE_RTOL = 1e-5


@dataclass(frozen=True)
class SaeLensRule:
    """A SAELens architecture with the config/weights that express a dictionary's inference rule."""

    architecture: str
    extra_cfg: Mapping[str, Any] = field(default_factory=dict)
    extra_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    boundary: Boundary = "exact"
    k: Optional[int] = None
    """The top-k's k (boundary "topk"/"abstopk")."""
    declared: bool = False
    """From the dictionary class's declared rule (not found by trying candidates)."""


@dataclass(frozen=True)
class NoSaeLensForm:
    """A declared inference rule SAELens has no architecture for."""

    reason: str


Declaration = Union[SaeLensRule, NoSaeLensForm]


@dataclass
class SaeLensCopy:
    """What ``sae_lens.SAE.load_from_disk`` reads: ``cfg.json`` and ``sae_weights.safetensors``."""

    cfg: dict
    state_dict: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]


# --- declared inference rules ------------------------------------------------------------------
def _k(sae: DictionarySAE, trainer_cfg: Mapping[str, Any]) -> Optional[int]:
    k = getattr(sae.dictionary, "k", None)
    if isinstance(k, torch.Tensor):
        return int(k)
    if isinstance(k, int):
        return k
    k = trainer_cfg.get("k")
    return k if isinstance(k, int) and k > 0 else None


def _topk(sae: DictionarySAE, trainer_cfg: Mapping[str, Any]) -> SaeLensRule:
    k = _k(sae, trainer_cfg)
    return SaeLensRule("topk", {"k": k}, boundary="topk", k=k, declared=True)


def _jumprelu(sae: DictionarySAE) -> SaeLensRule:
    # relu(pre) * (relu(pre) > t) == relu(pre) * (pre > max(t, 0)): SAELens's JumpReLU
    threshold = sae.dictionary.threshold.detach().float().clamp_min(0.0).expand(sae.cfg.d_sae).clone()
    return SaeLensRule("jumprelu", {}, {"threshold": threshold}, boundary="threshold", declared=True)


def _declare_dl_topk(sae, trainer_cfg):
    return _topk(sae, trainer_cfg)


def _declare_dl_batch_topk(sae, trainer_cfg):
    return _jumprelu(sae)  # its encode uses the learned threshold at inference (use_threshold=True)


def _declare_relu(sae, trainer_cfg):
    return SaeLensRule("standard", boundary="relu", declared=True)


def _declare_vsae(sae, trainer_cfg):
    if sae.dictionary.code_activation == "relu":
        return SaeLensRule("standard", boundary="relu", declared=True)
    return NoSaeLensForm(f"its codes are its means with code_activation={sae.dictionary.code_activation!r} "
                         "(no sparsifying activation), which no SAELens architecture computes")


def _declare_vsae_topk(sae, trainer_cfg):
    d = sae.dictionary
    if d.mean_activation == "relu":  # codes >= 0: ranking by value or by magnitude is the same
        return _topk(sae, trainer_cfg)
    if d.select_by == "magnitude":
        k = _k(sae, trainer_cfg)
        return SaeLensRule("abstopk", {"k": k}, boundary="abstopk", k=k, declared=True)
    return NoSaeLensForm("signed codes (mean_activation='identity') selected by value: SAELens's topk applies "
                         "a ReLU and its abstopk ranks by magnitude")


def _declare_mp(sae, trainer_cfg):
    d = sae.dictionary
    if d.select != "relu":
        return NoSaeLensForm(f"matching pursuit with select={d.select!r}: SAELens's matching_pursuit selects by "
                             "ReLU correlation")
    # k fixed pursuit steps (residual_threshold 0 turns SAELens's early stop off); tied, so no W_enc.
    return SaeLensRule("matching_pursuit", {"residual_threshold": 0.0, "max_iterations": int(d.k),
                                            "stop_on_duplicate_support": False}, boundary="exact", declared=True)


def _declared_rules() -> list[tuple[type, Callable[[DictionarySAE, Mapping[str, Any]], Declaration]]]:
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    from dictionary_learning_ext.mp_sae import MPSAE
    from dictionary_learning_ext.vsae import VSAE
    from dictionary_learning_ext.vsae_topk import VSAETopK

    return [
        (AutoEncoderTopK, _declare_dl_topk),
        (BatchTopKSAE, _declare_dl_batch_topk),
        (AutoEncoder, _declare_relu),
        (VSAETopK, _declare_vsae_topk),
        (VSAE, _declare_vsae),
        (MPSAE, _declare_mp),
    ]


DECLARED_RULES: list[tuple[type, Callable[[DictionarySAE, Mapping[str, Any]], Declaration]]] = []
"""(dictionary class, its inference rule as SAELens expresses it); the built-in ones are added on first use.
A new architecture may add its own with ``declare_saelens_rule``."""


def declare_saelens_rule(dict_class: type, rule: Callable[[DictionarySAE, Mapping[str, Any]], Declaration]) -> None:
    """Declare how SAELens expresses ``dict_class``'s encode: ``rule(sae, trainer_cfg)`` returns a
    ``SaeLensRule`` or ``NoSaeLensForm``."""
    _ensure_builtin_rules()
    DECLARED_RULES.insert(0, (dict_class, rule))


def _ensure_builtin_rules() -> None:
    if not any(getattr(fn, "__module__", None) == __name__ for _, fn in DECLARED_RULES):
        DECLARED_RULES.extend(_declared_rules())


def declared_rule(sae: DictionarySAE, trainer_cfg: Mapping[str, Any]) -> Optional[Declaration]:
    """The declared inference rule of the wrapped dictionary's class, or None if it declares none."""
    _ensure_builtin_rules()
    for dict_class, rule in DECLARED_RULES:
        if isinstance(sae.dictionary, dict_class):
            return rule(sae, trainer_cfg)
    return None


def _candidates(sae: DictionarySAE, trainer_cfg: Mapping[str, Any]) -> Iterator[SaeLensRule]:
    """SAELens architectures that might express an undeclared dictionary; tried in order."""
    yield SaeLensRule("standard", boundary="relu")
    k = _k(sae, trainer_cfg)
    if k is not None:
        yield SaeLensRule("topk", {"k": k}, boundary="topk", k=k)
        yield SaeLensRule("abstopk", {"k": k}, boundary="abstopk", k=k)
        yield SaeLensRule("matching_pursuit", {"residual_threshold": 0.0, "max_iterations": k,
                                               "stop_on_duplicate_support": False}, boundary="exact")
    if isinstance(getattr(sae.dictionary, "threshold", None), torch.Tensor):
        rule = _jumprelu(sae)
        yield SaeLensRule(rule.architecture, rule.extra_cfg, rule.extra_weights, boundary="threshold")


# --- config and model ----------------------------------------------------------------------------
def _saelens_cfg(sae: DictionarySAE, rule: SaeLensRule, trainer_cfg: Mapping[str, Any],
                 metadata: Mapping[str, Any]) -> dict:
    return {
        "architecture": rule.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        # False for a dictionary whose encoder reads x itself (center_input=False, e.g. vsae_topk:authors).
        "apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **rule.extra_cfg,
        "metadata": {
            "model_name": trainer_cfg["lm_name"],
            "hook_name": sae.cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": None,
            "context_size": trainer_cfg.get("context_size"),
            "dataset_path": None,
            "model_from_pretrained_kwargs": {},
            "training_trainer_class": trainer_cfg["trainer_class"],
            **metadata,
        },
    }


def build_saelens(cfg: dict, weights: dict[str, torch.Tensor]):
    from sae_lens import SAE

    model = SAE.from_dict(dict(cfg))
    model.load_state_dict(_own_weights(model, weights))
    return model.eval()


def _own_weights(model, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# --- the tie-tolerant comparison -----------------------------------------------------------------
@dataclass(frozen=True)
class PreActivations:
    """Pre-activations in float64 and the bound on how far two float32 evaluations of them can differ."""

    pre: torch.Tensor
    eps: torch.Tensor

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor], x: torch.Tensor, apply_b_dec: bool) -> "PreActivations":
        W = params["W_enc"].double()
        b = params["b_enc"].double()
        x_in = x.double() - params["b_dec"].double() if apply_b_dec else x.double()
        # The rounding error of a float32 dot product is a few units of roundoff times sum |x_i w_i| (its
        # standard deviation is about u * sum|x_i w_i| for sequential summation, less for blocked or pairwise
        # summation); TIE_ULPS of them bound the difference of two evaluations with a wide margin, while
        # staying far below the gaps between neighbouring pre-activations that decide a selection.
        magnitude = x_in.abs() @ W.abs() + b.abs()
        return cls(pre=x_in @ W + b, eps=TIE_ULPS * FLOAT32_UNIT_ROUNDOFF * magnitude)


def near_boundary(rule: SaeLensRule, pa: PreActivations, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, F) mask of latents whose pre-activation lies within rounding of where ``rule`` switches them."""
    pre, eps = pa.pre, pa.eps
    if rule.boundary == "exact":
        return torch.zeros_like(pre, dtype=torch.bool)
    at_zero = pre.abs() <= eps
    if rule.boundary == "relu":
        return at_zero
    if rule.boundary == "threshold":
        t = rule.extra_weights["threshold"].double()
        return at_zero | ((pre - t).abs() <= eps)
    key = pre.abs() if rule.boundary == "abstopk" else pre
    k = min(int(rule.k), pre.shape[-1])
    kth = key.topk(k, dim=-1)
    tau = kth.values[:, -1:]  # the k-th largest key per row
    eps_tau = eps.gather(-1, kth.indices[:, -1:])
    return at_zero | ((key - tau).abs() <= eps + eps_tau)


@dataclass
class Comparison:
    ok: bool
    why: str = ""
    tied_rows: int = 0


def compare_codes(rule: SaeLensRule, f_ours: torch.Tensor, f_theirs: torch.Tensor, pa: PreActivations,
                  params: Mapping[str, torch.Tensor]) -> Comparison:
    """Whether two encodes agree up to near ties (see module docstring)."""
    if f_ours.shape != f_theirs.shape:
        return Comparison(False, f"codes of shape {tuple(f_ours.shape)} vs SAELens's {tuple(f_theirs.shape)}")
    o, t = f_ours.double(), f_theirs.double()
    scale = max(float(o.abs().max()), float(t.abs().max()), 1.0)
    tol = torch.maximum(VALUE_RTOL * (o.abs().maximum(t.abs()) + scale), pa.eps)
    differs = (o - t).abs() > tol
    if not differs.any():
        return Comparison(True)
    switched = differs & ((o == 0) | (t == 0)) & near_boundary(rule, pa, params)
    unexplained = differs & ~switched
    if unexplained.any():
        n, j = (int(i) for i in unexplained.nonzero()[0])
        return Comparison(False, f"{int(unexplained.sum())} code(s) in {int(unexplained.any(-1).sum())} of {len(o)} "
                                 f"rows differ away from any near tie (e.g. row {n}, latent {j}: {float(o[n, j]):.6g} "
                                 f"here, {float(t[n, j]):.6g} in SAELens; pre-activation {float(pa.pre[n, j]):.6g})")
    if rule.boundary in ("topk", "abstopk"):
        # At a top-k's k-th place a near tie swaps latents: every latent only one side selects has a partner
        # the other side selects instead. An unpaired one is a different number of latents (e.g. another k).
        only_ours, only_theirs = (switched & (t == 0)).sum(-1), (switched & (o == 0)).sum(-1)
        unpaired = only_ours != only_theirs
        if unpaired.any():
            n = int(unpaired.nonzero()[0])
            return Comparison(False, f"{int(unpaired.sum())} of {len(o)} rows select a different number of latents "
                                     f"(e.g. row {n}: {int(only_ours[n])} only here, {int(only_theirs[n])} only in "
                                     "SAELens): not a swap of tied latents (e.g. another k)")
    return Comparison(True, tied_rows=int(switched.any(-1).sum()))


def compare_reconstructions(rec_ours: torch.Tensor, rec_theirs: torch.Tensor, f_ours: torch.Tensor,
                            f_theirs: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> Comparison:
    """Reconstructions agree up to what the codes' differences and float32 rounding explain."""
    o, t = f_ours.double(), f_theirs.double()
    W = W_dec.double().abs()
    gamma = TIE_ULPS * FLOAT32_UNIT_ROUNDOFF
    scale = max(float(rec_ours.abs().max()), 1.0)
    allowed = (o - t).abs() @ W + 2 * gamma * (o.abs().maximum(t.abs()) @ W + b_dec.double().abs()) \
        + VALUE_RTOL * scale
    excess = (rec_ours.double() - rec_theirs.double()).abs() - allowed
    if (excess > 0).any():
        n, d = (int(i) for i in (excess > 0).nonzero()[0])
        return Comparison(False, f"reconstructions differ beyond what the codes explain (row {n}, dim {d}: "
                                 f"{float(rec_ours[n, d]):.6g} here, {float(rec_theirs[n, d]):.6g} in SAELens)")
    return Comparison(True)


@torch.no_grad()
def check_rule(sae: DictionarySAE, rule: SaeLensRule, cfg: dict, x_ND: torch.Tensor,
               probes: list[dict[str, torch.Tensor]]) -> Comparison:
    """Whether SAELens with ``cfg`` reproduces the dictionary's encode and reconstruction on ``x_ND`` under
    every parameter set in ``probes``, up to near ties."""
    tied_rows = 0
    for i, params in enumerate(probes):
        own = {r: v.to(sae.W_dec.dtype) for r, v in params.items()}
        if isinstance(sae, TiedDictionarySAE):  # its encoder is its decoder: W_enc = W_dec^T, b_enc = 0
            params = {**params, "W_enc": params["W_dec"].T, "b_enc": torch.zeros(sae.cfg.d_sae)}
        f_ours = sae.call_dictionary("encode", x_ND, params=own)
        model = build_saelens(cfg, {**params, **rule.extra_weights})
        f_theirs = model.encode(x_ND)
        pa = PreActivations.of(params, x_ND, bool(sae.cfg.apply_b_dec_to_input))
        codes = compare_codes(rule, f_ours, f_theirs, pa, params)
        if not codes.ok:
            return Comparison(False, f"parameter set {i}: {codes.why}")
        rec = compare_reconstructions(sae.call_dictionary("decode", f_ours, params=own), model.decode(f_theirs),
                                      f_ours, f_theirs, params["W_dec"], params["b_dec"])
        if not rec.ok:
            return Comparison(False, f"parameter set {i}: {rec.why}")
        tied_rows += codes.tied_rows
    return Comparison(True, tied_rows=tied_rows)


# --- the export -----------------------------------------------------------------------------------
@torch.no_grad()
def to_saelens(sae: DictionarySAE, trainer_cfg: Mapping[str, Any],
               metadata: Optional[Mapping[str, Any]] = None) -> SaeLensCopy:
    """The SAELens config + weights that reproduce ``sae`` (up to near ties), or ExportError.

    ``metadata``: SAELens metadata from the training run (``context_size``, ``dataset_path``,
    ``prepend_bos``, ...); what is not given stays null (unknown)."""
    sae = sae.to(device="cpu", dtype=torch.float32)
    x_ND = probe_inputs(sae, n=384).float()
    probes = _parameter_probes(sae, x_ND)
    what = f"{trainer_cfg['trainer_class']} ({type(sae.dictionary).__name__})"
    declared = declared_rule(sae, trainer_cfg)
    if isinstance(declared, NoSaeLensForm):
        raise ExportError(
            f"{what} with this config has no SAELens equivalent: {declared.reason}. Not writing a SAELens copy "
            "that would compute something else; export with --allow-missing-saelens to skip it."
        )
    rules = [declared] if declared is not None else list(_candidates(sae, trainer_cfg))
    failures = []
    for rule in rules:
        cfg = _saelens_cfg(sae, rule, trainer_cfg, metadata or {})
        result = check_rule(sae, rule, cfg, x_ND, probes)
        if not result.ok:
            failures.append(f"{rule.architecture}: {result.why}")
            continue
        weights = {r: getattr(sae, r).detach().float().cpu().contiguous() for r in ("W_enc", "b_enc", "W_dec", "b_dec")}
        weights.update(rule.extra_weights)
        model = build_saelens(cfg, weights)
        # SAELens's own serialisation of the config (adds e.g. metadata.sae_lens_version, which its
        # loader uses to tell the 6.x format from older ones).
        return SaeLensCopy(model.cfg.to_dict(), _own_weights(model, weights))
    if declared is not None:
        raise ExportError(
            f"{what}: its declared inference rule is SAELens {declared.architecture}, but SAELens "
            f"{declared.architecture} does not reproduce its encode ({failures[0].split(': ', 1)[1]}). Not writing "
            "a SAELens copy that would compute something else; export with --allow-missing-saelens to skip it."
        )
    raise ExportError(
        f"{what} with this config has no SAELens equivalent: none of the SAELens architectures "
        f"{[r.architecture for r in rules]} reproduces its encode (e.g. signed codes selected by value, or an "
        "identity code activation). Not writing a SAELens copy that would compute something else; export with "
        "--allow-missing-saelens to skip it."
    )


def safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state_dict.items()})
