"""One SAEBench ``BaseSAE`` for every dictionary in ``dictionary_learning_ext.ARCHITECTURES``.

``DictionarySAE`` owns the four tensors SAEBench reads (``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)``,
``b_enc``, ``b_dec``) and runs the wrapped dictionary's own ``encode``/``decode`` with exactly those
tensors substituted for the dictionary's encoder/decoder parameters (``torch.func.functional_call``).
The dictionary keeps no copy of them (they are removed from it), so there is one source of truth:
changing ``W_enc`` changes ``encode``, whatever ``.to()``/``load_state_dict`` did in between. Everything
else the dictionary has (``k``, ``threshold``, ``sigma``, an unused log-variance head, ...) stays in it
and is used as its ``encode`` uses it.

Which dictionary parameters play the four roles is found structurally, by dictionary_learning's naming
(``encoder``, ``decoder``, ``b_dec`` or ``bias``).

A tied architecture (registry ``saebench_tied_encoder``, e.g. matching pursuit, whose encode is not a
linear map but reads the decoder atoms) has no encoder parameters: it is wrapped as
``TiedDictionarySAE``, where ``W_enc`` is ``W_dec.T`` (a view, never a separate copy) and ``b_enc`` a
zero buffer, so SAEBench's encoder statistics describe the first pursuit step's correlations.

Decoder norms. SAEBench expects unit-norm decoder rows. A dictionary whose rows are not unit norm has them
folded into the encoder when that leaves its reconstructions unchanged (ReLU codes), and is refused when it
does not (TopK: scaling a latent's code changes which latents win) -- unless the dictionary declares a free
decoder (``unit_norm_decoder = False``, e.g. VSAETopK's ``authors`` variant, trained without the unit-norm
constraint). Such a dictionary is evaluated as trained: nothing is folded or refused, codes carry the scale
the training gave them (a latent's code times its atom's norm is its contribution), and SAEBench's own
``check_decoder_norms`` reports False (its evals only warn). What was done is recorded in
``cfg.decoder_norms`` ("unit", "folded" or "free"), which SAEBench writes into every result file's
``sae_cfg_dict``. ``cfg.apply_b_dec_to_input`` says whether the encoder reads x - b_dec (False for a
dictionary with ``center_input = False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn as nn
from sae_bench.custom_saes.base_sae import BaseSAE
from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig
from torch.func import functional_call

from dictionary_learning_ext.errors import ConfigError, MissingFileError, WrapperError
from dictionary_learning_ext.registry import Architecture, architecture_of, load_dictionary, read_trainer_config

# role -> candidate dotted names in the dictionary, first match wins.
DEFAULT_PARAM_CANDIDATES: dict[str, tuple[str, ...]] = {
    "W_enc": ("encoder.weight",),
    "b_enc": ("encoder.bias",),
    "W_dec": ("decoder.weight",),
    "b_dec": ("b_dec", "bias"),
}
TRANSPOSED = ("W_enc", "W_dec")  # nn.Linear stores (out, in): the transpose of SAEBench's orientation
UNIT_NORM_TOL = 1e-5
DecoderNorms = Literal["unit", "folded", "free"]


@dataclass
class DictionarySAEConfig(CustomSAEConfig):
    """SAEBench's config of a custom SAE, plus what the wrapper did with the decoder norms (a dataclass
    field, so SAEBench's ``cfg.to_dict()`` -- the ``sae_cfg_dict`` of its result files -- records it)."""

    decoder_norms: DecoderNorms = "unit"
    """"unit": the decoder rows were unit norm as trained. "folded": they were not, and their norms were
    moved into W_enc/b_enc (reconstructions unchanged). "free": the rows are presented as trained, nothing
    folded and not necessarily unit norm -- the dictionary declares a decoder trained without the unit-norm
    constraint (or the wrapper was built with fold_decoder_norms=False)."""
    eval_datasets: Optional[dict[str, Any]] = None
    """Set by the eval runner while an eval runs (``evals.dataset_record``): which data the eval reads --
    ``standins`` true/false, the datasets, the ones left out and why -- so every result file's ``sae_cfg_dict``
    says whether it is a result on the hub datasets or on generated stand-ins."""


def declares_free_decoder(dictionary: nn.Module) -> bool:
    """Whether ``dictionary`` says its decoder was trained free (``unit_norm_decoder = False``)."""
    return getattr(dictionary, "unit_norm_decoder", True) is False


class _MethodCall(nn.Module):
    """Calls ``inner.<method>(*args)`` so functional_call can substitute parameters for any method."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.inner, method)(*args)


TIED_ROLES = ("W_dec", "b_dec")


def is_tied(arch: Optional[Architecture]) -> bool:
    return bool(getattr(arch, "saebench_tied_encoder", False))


def param_names(dictionary: nn.Module, arch: Optional[Architecture] = None) -> dict[str, str]:
    """Role (W_enc, b_enc, W_dec, b_dec) -> dotted parameter name in ``dictionary`` (W_dec and b_dec
    only for a tied architecture)."""
    available = dict(dictionary.named_parameters())
    names = {}
    roles = TIED_ROLES if is_tied(arch) else tuple(DEFAULT_PARAM_CANDIDATES)
    for role in roles:
        candidates = DEFAULT_PARAM_CANDIDATES[role]
        found = [c for c in candidates if c in available]
        if not found:
            raise WrapperError(
                f"{type(dictionary).__name__} has no parameter for SAEBench's {role} (looked for {list(candidates)}; "
                f"it has {sorted(available)}). Name its parameters as dictionary_learning does (encoder, decoder, b_dec)."
            )
        names[role] = found[0]
    return names


def _detach_param(module: nn.Module, dotted: str) -> torch.Tensor:
    """Remove parameter ``dotted`` from ``module`` (leaving a None slot) and return its tensor."""
    *path, leaf = dotted.split(".")
    owner = module
    for attr in path:
        owner = getattr(owner, attr)
    tensor = owner._parameters[leaf]
    if tensor is None:
        raise WrapperError(f"{dotted} was already taken out of {type(module).__name__}: wrap each dictionary once")
    del owner._parameters[leaf]
    owner.register_parameter(leaf, None)
    return tensor.detach()


class DictionarySAE(BaseSAE):
    """A dictionary_learning-style dictionary as a SAEBench ``BaseSAE`` (see module docstring)."""

    def __new__(cls, dictionary: nn.Module, *args: Any, arch: Optional[Architecture] = None, **kwargs: Any):
        # A tied architecture always gets the tied wrapper, however it is constructed.
        if is_tied(arch) and not issubclass(cls, TiedDictionarySAE):
            cls = TiedDictionarySAE
        return super().__new__(cls)

    def __init__(
        self,
        dictionary: nn.Module,
        *,
        model_name: str,
        hook_layer: int,
        hook_name: Optional[str] = None,
        architecture: str = "",
        arch: Optional[Architecture] = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        fold_decoder_norms: bool = True,
    ):
        d_in, d_sae = int(dictionary.activation_dim), int(dictionary.dict_size)
        super().__init__(d_in, d_sae, model_name, hook_layer, torch.device(device), dtype, hook_name)
        self.cfg = DictionarySAEConfig(**{f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)})
        self.cfg.architecture = architecture or (arch.name if arch is not None else type(dictionary).__name__)
        self.cfg.apply_b_dec_to_input = bool(getattr(dictionary, "center_input", True))
        free_decoder = declares_free_decoder(dictionary)
        self._names = param_names(dictionary, arch)
        dictionary = dictionary.eval()
        taken = {role: _detach_param(dictionary, name) for role, name in self._names.items()}
        expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        with torch.no_grad():
            for role, tensor in taken.items():
                value = tensor.T if role in TRANSPOSED else tensor
                if tuple(value.shape) != expected[role]:
                    raise WrapperError(
                        f"{type(dictionary).__name__}.{self._names[role]} gives {role} of shape {tuple(value.shape)}, "
                        f"expected {expected[role]} for activation_dim={d_in}, dict_size={d_sae}"
                    )
                getattr(self, role).data = value.to(device=device, dtype=dtype).contiguous()
        self._call = _MethodCall(dictionary.to(device=device, dtype=dtype))
        if free_decoder:
            self.cfg.decoder_norms = "free"  # evaluated as trained: no folding, no refusal
        elif fold_decoder_norms:
            self.cfg.decoder_norms = "folded" if self._fold_decoder_norms() else "unit"
        else:
            norms = self.W_dec.detach().float().norm(dim=1)
            unit = torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_TOL)
            self.cfg.decoder_norms = "unit" if unit else "free"

    @property
    def dictionary(self) -> nn.Module:
        return self._call.inner

    # --- the substitution --------------------------------------------------------------
    def _substituted(self) -> dict[str, torch.Tensor]:
        return {
            f"inner.{name}": (getattr(self, role).T if role in TRANSPOSED else getattr(self, role))
            for role, name in self._names.items()
        }

    def call_dictionary(self, method: str, *args: Any, params: Optional[Mapping[str, torch.Tensor]] = None) -> Any:
        """``dictionary.<method>(*args)`` run with this wrapper's W_enc/W_dec/b_enc/b_dec (or ``params``,
        a role -> tensor mapping in SAEBench's orientation, for probing the encode function)."""
        subst = self._substituted()
        if params is not None:
            for role, value in params.items():
                if role not in self._names:
                    continue  # a derived role (tied W_enc/b_enc): the dictionary has no such parameter
                subst[f"inner.{self._names[role]}"] = value.T if role in TRANSPOSED else value
        return functional_call(self._call, subst, (method, *args))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` ((..., d_in) -> (..., d_sae)); deterministic (the dictionary's eval encode)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ConfigError(f"encode expects (..., {self.cfg.d_in}) activations, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        out = self.call_dictionary("encode", x.reshape(-1, self.cfg.d_in))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(self.dictionary).__name__}.encode returned {type(out).__name__}, not a tensor")
        return out.reshape(*lead, self.cfg.d_sae)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        lead = feature_acts.shape[:-1]
        out = self.call_dictionary("decode", feature_acts.reshape(-1, self.cfg.d_sae))
        return out.reshape(*lead, self.cfg.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- unit-norm decoder -------------------------------------------------------------
    @torch.no_grad()
    def _fold_decoder_norms(self) -> bool:
        """Make W_dec rows unit norm by moving their norms into W_enc/b_enc, if that leaves the
        reconstructions unchanged (true for ReLU codes; not for TopK, where it changes the winners).
        Returns whether anything was folded."""
        norms = self.W_dec.float().norm(dim=1)
        if torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_TOL):
            return False
        if (norms == 0).any():
            raise WrapperError(f"{int((norms == 0).sum())} decoder rows are zero; cannot normalise them")
        probe = probe_inputs(self, n=256)
        before = self(probe)
        saved = {r: getattr(self, r).data.clone() for r in ("W_enc", "b_enc", "W_dec")}
        n = norms.to(self.W_dec.dtype)
        self.W_dec.data = self.W_dec.data / n[:, None]
        self.W_enc.data = self.W_enc.data * n[None, :]
        self.b_enc.data = self.b_enc.data * n
        after = self(probe)
        if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max().clamp_min(1.0))):
            for r, v in saved.items():
                getattr(self, r).data = v
            raise WrapperError(
                f"{type(self.dictionary).__name__}: decoder rows are not unit norm (norms in "
                f"[{float(norms.min()):.4g}, {float(norms.max()):.4g}]) and folding the norms into the encoder "
                "changes its reconstructions (e.g. TopK selection); SAEBench needs unit-norm decoder rows. "
                "Train with the decoder constrained to unit norm (or, for a decoder trained free on purpose, have "
                "the dictionary declare unit_norm_decoder = False: it is then evaluated as trained)."
            )
        return True


class TiedDictionarySAE(DictionarySAE):
    """A dictionary whose encoder reads its decoder (registry ``saebench_tied_encoder``): ``W_enc`` is
    ``W_dec.T`` and ``b_enc`` is 0, both derived. Built by ``DictionarySAE(..., arch=tied_arch)``."""

    def __init__(self, dictionary: nn.Module, **kwargs: Any):
        super().__init__(dictionary, **kwargs)
        # BaseSAE registered free W_enc/b_enc parameters; a tied encoder has none.
        del self._parameters["W_enc"], self._parameters["b_enc"]
        self.register_buffer("b_enc", torch.zeros(self.cfg.d_sae, device=self.W_dec.device, dtype=self.W_dec.dtype),
                             persistent=False)

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802  (SAEBench's name)
        return self.W_dec.T

    @torch.no_grad()
    def _fold_decoder_norms(self) -> bool:
        """Norms cannot be folded into a tied encoder: the decoder must already be unit norm."""
        norms = self.W_dec.float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_TOL):
            raise WrapperError(
                f"{type(self.dictionary).__name__}: decoder rows are not unit norm (norms in "
                f"[{float(norms.min()):.4g}, {float(norms.max()):.4g}]) and a tied encoder has no weights to fold "
                "them into; SAEBench needs unit-norm decoder rows. Train with the decoder constrained to unit norm."
            )
        return False


@torch.no_grad()
def probe_inputs(sae: BaseSAE, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Inputs around b_dec at several scales (reproducible), for numeric equivalence checks."""
    gen = torch.Generator().manual_seed(seed)
    d = sae.cfg.d_in
    scales = torch.tensor([0.1, 1.0, 10.0]).repeat_interleave((n + 2) // 3)[:n, None]
    x = torch.randn(n, d, generator=gen) * scales
    return (x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype) + sae.b_dec.detach())


def wrap_dictionary(
    dictionary: nn.Module,
    trainer_config: Mapping[str, Any],
    *,
    model_name: Optional[str] = None,
    hook_name: Optional[str] = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DictionarySAE:
    """Wrap a loaded dictionary, reading its architecture, layer and lm_name from its saved trainer config."""
    for key in ("trainer_class", "layer", "lm_name"):
        if key not in trainer_config:
            raise WrapperError(f"trainer config has no {key!r}; it must be the 'trainer' part of a trainSAE config.json")
    arch = architecture_of(trainer_config)
    if not isinstance(dictionary, arch.dict_class):
        raise WrapperError(
            f"config says {arch.trainer_class.__name__} (trains {arch.dict_class.__name__}) but got a "
            f"{type(dictionary).__name__}"
        )
    for key in ("activation_dim", "dict_size"):
        if key in trainer_config and int(trainer_config[key]) != int(getattr(dictionary, key)):
            raise WrapperError(
                f"config {key}={trainer_config[key]} but the dictionary has {key}={getattr(dictionary, key)}"
            )
    return DictionarySAE(
        dictionary,
        model_name=model_name or trainer_config["lm_name"],
        hook_layer=int(trainer_config["layer"]),
        hook_name=hook_name,
        arch=arch,
        device=device,
        dtype=dtype,
    )


def load_sae(
    trainer_dir: str | Path,
    *,
    model_name: Optional[str] = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DictionarySAE:
    """Load a trainSAE trainer folder (``ae.pt`` + ``config.json``) of any registered architecture as a
    SAEBench SAE. ``model_name`` overrides the config's ``lm_name`` (what SAEBench loads the LM by)."""
    dictionary, config = load_dictionary(trainer_dir, device="cpu")
    return wrap_dictionary(dictionary, config["trainer"], model_name=model_name, device=device, dtype=dtype)


# --- the trainer folders of a run -----------------------------------------------------------
def trainer_dirs(run_dir: str | Path) -> list[Path]:
    """The trainer folders (holding config.json + ae.pt) of a training run, sorted; a trainer folder itself
    is accepted too. Raises if there are none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"{run_dir} is not a directory: pass the save_dir of a training run")
    if (run_dir / "config.json").is_file():
        return [run_dir]
    found = sorted(
        {
            p.parent for p in run_dir.rglob("config.json")
            if "checkpoints" not in p.relative_to(run_dir).parts and (p.parent / "ae.pt").is_file()
        },
        key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p.relative_to(run_dir)))],
    )
    if not found:
        raise MissingFileError(
            f"no trainer folders (config.json + ae.pt) under {run_dir}: the run did not finish or this is not a "
            "dictionary_learning save_dir"
        )
    return found


def relative_trainer_dir(run_dir: str | Path, trainer_dir: str | Path) -> str:
    """``trainer_dir`` relative to ``run_dir``, POSIX-style ("trainer_0"; "." when they are one folder)."""
    return Path(trainer_dir).resolve().relative_to(Path(run_dir).resolve()).as_posix()


def sae_name(run_dir: str | Path, trainer_dir: str | Path) -> str:
    """The name a trainer's SAE is evaluated under (SAEBench names its result files by it):
    ``"<run>_<trainer path>"`` with "/" as "_" (e.g. "my_run_trainer_0"), or ``"<run>"`` when
    ``run_dir`` is the trainer folder itself."""
    run_name = Path(run_dir).resolve().name
    rel = relative_trainer_dir(run_dir, trainer_dir)
    if rel == ".":
        return run_name
    return f"{run_name}_{rel}".replace("/", "_").rstrip("_.")


# --- the SAEs of a run, named -----------------------------------------------------------------
@dataclass(frozen=True)
class NamedSAE:
    """One SAE of a run with the names it is evaluated and looked up by."""

    name: str
    """``sae_name(run_dir, trainer_dir)``: what SAEBench names its result files by."""
    trainer_dir: str
    """The trainer folder relative to the run folder (e.g. "trainer_0")."""
    sae: DictionarySAE


def run_layer(run_dir: str | Path) -> int:
    """The layer every SAE of the run reads (raises if they read different layers)."""
    layers = {int(read_trainer_config(d)["trainer"]["layer"]) for d in trainer_dirs(run_dir)}
    if len(layers) != 1:
        raise ConfigError(f"SAEs in {run_dir} are on different layers {sorted(layers)}; evaluate them separately")
    return layers.pop()


def load_run_saes(
    run_dir: str | Path,
    model_name: str,
    *,
    d_model: Optional[int] = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[NamedSAE]:
    """Every SAE of a run, named, for evaluation on ``model_name`` (and a residual width ``d_model``, if
    given); refuses SAEs trained on another model or for another width."""
    saes = []
    for trainer_dir in trainer_dirs(run_dir):
        lm = read_trainer_config(trainer_dir)["trainer"]["lm_name"]
        # The hub organisation may be left out (TransformerLens names are often shortened HF names).
        if lm != model_name and lm.split("/")[-1] != model_name.split("/")[-1]:
            raise ConfigError(
                f"{trainer_dir} was trained on {lm!r} but the evals would run on {model_name!r}; pass --model {lm}"
            )
        sae = load_sae(trainer_dir, model_name=model_name, device=device, dtype=dtype)
        saes.append(NamedSAE(sae_name(run_dir, trainer_dir), relative_trainer_dir(run_dir, trainer_dir), sae))
    wrong_width = [s.name for s in saes if d_model is not None and s.sae.cfg.d_in != d_model]
    if wrong_width:
        raise ConfigError(f"SAEs {wrong_width} have d_in != the model's d_model {d_model}")
    return saes
