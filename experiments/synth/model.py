"""The synthetic model: SynthSAEBench-style settings as typed, validated dataclasses, built with SAELens's
own ``SyntheticModelConfig`` / ``SyntheticModel`` (or loaded from the hub), and the ground-truth structure
(hierarchy, correlations, firing rates) the per-feature analyses group features by.

Every family SynthSAEBench uses is here, with SAELens's parameters under their SAELens names: Zipfian
firing probabilities, a forest of mutually exclusive children scaled by their parent, a low-rank Gaussian
copula for correlated firing, orthogonalised feature vectors, linear mean / folded-normal std magnitudes and
a bias. ``SyntheticModelSpec.from_dict`` refuses unknown or missing keys (naming them), every field is
type-checked, and the ranges SAELens would only discover deep inside its generators are checked here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dictionary_learning_ext.config import check_field_types, dataclass_from_dict
from dictionary_learning_ext.errors import ConfigError, DataError

__all__ = ["CorrelationSpec", "FiringSpec", "HierarchySpec", "HubUnavailableError", "MagnitudeSpec",
           "OrthogonalizationSpec", "SyntheticModelSpec", "build_model", "feature_structure", "load_from_hub",
           "save_model", "saved_model_matches", "scaled_down"]

MODEL_DIR = "synthetic_model"
"""Where a study keeps its synthetic model (SAELens's own save format: config, weights, hierarchy)."""


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0 or (isinstance(value, float) and math.isinf(value)):
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive finite number, got {value!r}")


class _Spec:
    """Typed, validated, built from a dict that may hold no unknown key."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:  # ranges; overridden
        pass

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.__name__} must be given as a mapping of its fields, got {values!r}")
        return dataclass_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FiringSpec(_Spec):
    """Zipfian firing probabilities (SAELens ``ZipfianFiringProbabilityConfig``): feature i (0-based) fires
    with p_min + (p_max - p_min) * ((i+1)^-exponent - F^-exponent) / (1 - F^-exponent); feature 0 is the
    most frequent."""

    exponent: float = 0.5
    """Zipf exponent."""
    max_prob: float = 0.4
    """Firing probability of the most frequent feature."""
    min_prob: float = 5e-4
    """Firing probability of the rarest feature."""

    def validate(self) -> None:
        _positive(self, "exponent")
        if not 0 < self.min_prob < self.max_prob <= 1:
            raise ConfigError(f"FiringSpec needs 0 < min_prob < max_prob <= 1, got min_prob={self.min_prob}, "
                              f"max_prob={self.max_prob}")


@dataclass(frozen=True)
class HierarchySpec(_Spec):
    """A forest of feature trees (SAELens ``HierarchyConfig``): a child fires only with its parent; siblings
    under a mutually exclusive parent never fire together."""

    total_root_nodes: int = 128
    """Trees; roots take the first (most frequent) feature indices, then their children breadth-first."""
    branching_factor: int = 4
    """Children per parent."""
    max_depth: int = 3
    """Levels below the root (depth 3: root, children, grandchildren, great-grandchildren)."""
    mutually_exclusive_portion: float = 1.0
    """Share of parents whose children are mutually exclusive."""
    mutually_exclusive_min_depth: int = 0
    """Shallowest parent depth at which children may be mutually exclusive."""
    compensate_probabilities: bool = True
    """Raise children's base probabilities so their effective firing rates follow the Zipf curve despite the
    parent gating and the mutual exclusion (as SynthSAEBench-16k does)."""
    scale_children_by_parent: bool = True
    """A child's magnitude is scaled by its parent's activation / parent mean (not just gated)."""

    def validate(self) -> None:
        if self.total_root_nodes < 1:
            raise ConfigError(f"HierarchySpec.total_root_nodes must be >= 1, got {self.total_root_nodes}")
        if self.branching_factor < 2:
            raise ConfigError(f"HierarchySpec.branching_factor must be >= 2, got {self.branching_factor}")
        if self.max_depth < 1:
            raise ConfigError(f"HierarchySpec.max_depth must be >= 1, got {self.max_depth}")
        if not 0 <= self.mutually_exclusive_portion <= 1:
            raise ConfigError("HierarchySpec.mutually_exclusive_portion must be in [0, 1], got "
                              f"{self.mutually_exclusive_portion}")
        if self.mutually_exclusive_min_depth < 0:
            raise ConfigError("HierarchySpec.mutually_exclusive_min_depth must be >= 0, got "
                              f"{self.mutually_exclusive_min_depth}")

    @property
    def tree_size(self) -> int:
        """Features in one full tree."""
        return sum(self.branching_factor**d for d in range(self.max_depth + 1))


@dataclass(frozen=True)
class CorrelationSpec(_Spec):
    """Low-rank Gaussian copula for correlated firing (SAELens ``LowRankCorrelationConfig``): feature i's
    latent Gaussian is f_i . eps + sqrt(1 - |f_i|^2) eta_i, f_i ~ N(0, scale^2 I_rank)."""

    rank: int = 25
    """Shared latent factors."""
    correlation_scale: float = 0.1
    """Scale of each factor loading (rank * scale^2 is the mean share of shared variance)."""

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"CorrelationSpec.rank must be >= 1, got {self.rank}")
        if not 0 <= self.correlation_scale < float("inf"):
            raise ConfigError(f"CorrelationSpec.correlation_scale must be >= 0, got {self.correlation_scale}")
        if self.rank * self.correlation_scale**2 >= 1:
            raise ConfigError(f"CorrelationSpec: rank * correlation_scale^2 = {self.rank * self.correlation_scale**2:.3g} "
                              "must stay below 1 (it is the mean share of a feature's variance from the shared factors)")


@dataclass(frozen=True)
class OrthogonalizationSpec(_Spec):
    """Gradient steps pushing the random unit feature vectors apart (SAELens ``OrthogonalizationConfig``)."""

    num_steps: int = 100
    """Adam steps."""
    lr: float = 3e-4
    """Adam learning rate."""

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"OrthogonalizationSpec.num_steps must be >= 1, got {self.num_steps}")
        _positive(self, "lr")


@dataclass(frozen=True)
class MagnitudeSpec(_Spec):
    """Firing magnitudes: per-feature mean linear from ``mean_start`` (feature 0) to ``mean_end`` (SAELens
    ``LinearMagnitudeConfig``), per-feature std drawn from |N(std_mean, std_std^2)| (SAELens
    ``FoldedNormalMagnitudeConfig``); a firing's magnitude is relu(mean + std * N(0, 1))."""

    mean_start: float = 5.0
    """Mean magnitude of the most frequent feature."""
    mean_end: float = 4.0
    """Mean magnitude of the rarest feature."""
    std_mean: float = 0.5
    """Mean of the folded normal the per-feature stds are drawn from."""
    std_std: float = 0.5
    """Std of that folded normal."""

    def validate(self) -> None:
        _positive(self, "mean_start", "mean_end", "std_std")
        if not math.isfinite(self.std_mean):
            raise ConfigError(f"MagnitudeSpec.std_mean must be finite, got {self.std_mean}")


NESTED = {"firing": FiringSpec, "hierarchy": HierarchySpec, "correlation": CorrelationSpec,
          "orthogonalization": OrthogonalizationSpec, "magnitudes": MagnitudeSpec}


@dataclass(frozen=True)
class SyntheticModelSpec(_Spec):
    """A SynthSAEBench-style synthetic model: ``num_features`` ground-truth unit vectors in ``hidden_dim``
    dimensions; an activation is sum_i a_i d_i + bias with sparse non-negative a."""

    num_features: int
    """Ground-truth features."""
    hidden_dim: int
    """Dimension of the activations."""
    firing: FiringSpec = field(default_factory=FiringSpec)
    """Firing probabilities."""
    hierarchy: Optional[HierarchySpec] = field(default_factory=HierarchySpec)
    """Feature trees (None: none)."""
    correlation: Optional[CorrelationSpec] = field(default_factory=CorrelationSpec)
    """Correlated firing (None: independent Bernoulli firing)."""
    orthogonalization: Optional[OrthogonalizationSpec] = field(default_factory=OrthogonalizationSpec)
    """Feature-vector orthogonalisation (None: random unit vectors)."""
    magnitudes: MagnitudeSpec = field(default_factory=MagnitudeSpec)
    """Firing magnitudes."""
    bias: float = 0.5
    """Norm of the constant bias vector added to every activation (0: none)."""
    seed: int = 42
    """Seeds everything the model is built from (SAELens offsets it per component)."""
    hub_repo: Optional[str] = None
    """A Hugging Face repo holding this exact model, SAELens's save format (``SyntheticModel.from_pretrained``);
    used instead of the local build when reachable."""

    def validate(self) -> None:
        if self.num_features < 2:
            raise ConfigError(f"SyntheticModelSpec.num_features must be >= 2, got {self.num_features}")
        if self.hidden_dim < 2:
            raise ConfigError(f"SyntheticModelSpec.hidden_dim must be >= 2, got {self.hidden_dim}")
        if not 0 <= self.bias < float("inf"):
            raise ConfigError(f"SyntheticModelSpec.bias must be a finite number >= 0, got {self.bias}")
        if self.seed < 0:
            raise ConfigError(f"SyntheticModelSpec.seed must be >= 0, got {self.seed}")
        if self.hierarchy is not None and self.hierarchy.total_root_nodes > self.num_features:
            raise ConfigError(f"SyntheticModelSpec: hierarchy.total_root_nodes {self.hierarchy.total_root_nodes} exceeds "
                              f"num_features {self.num_features}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SyntheticModelSpec":
        if not isinstance(values, Mapping):
            raise ConfigError(f"SyntheticModelSpec must be given as a mapping of its fields, got {values!r}")
        values = dict(values)
        for key, spec_class in NESTED.items():
            if isinstance(values.get(key), Mapping):
                values[key] = spec_class.from_dict(values[key])
        return dataclass_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (value.to_dict() if isinstance(value, _Spec) else value)
                for f in fields(self) for value in [getattr(self, f.name)]}

    def replace(self, **changes: Any) -> "SyntheticModelSpec":
        return SyntheticModelSpec.from_dict({**self.to_dict(), **changes})

    # --- SAELens ------------------------------------------------------------------------------
    def saelens_config(self):
        """The equivalent ``sae_lens.synthetic.SyntheticModelConfig``."""
        from sae_lens.synthetic import (
            FoldedNormalMagnitudeConfig,
            HierarchyConfig,
            LinearMagnitudeConfig,
            LowRankCorrelationConfig,
            OrthogonalizationConfig,
            SyntheticModelConfig,
            ZipfianFiringProbabilityConfig,
        )

        h, c, o, m = self.hierarchy, self.correlation, self.orthogonalization, self.magnitudes
        return SyntheticModelConfig(
            num_features=self.num_features,
            hidden_dim=self.hidden_dim,
            firing_probability=ZipfianFiringProbabilityConfig(**self.firing.to_dict()),
            hierarchy=HierarchyConfig(**h.to_dict()) if h is not None else None,
            orthogonalization=OrthogonalizationConfig(num_steps=o.num_steps, lr=o.lr) if o is not None else None,
            correlation=(LowRankCorrelationConfig(rank=c.rank, correlation_scale=c.correlation_scale)
                         if c is not None else None),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=m.mean_start, end=m.mean_end),
            std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=m.std_mean, std=m.std_std),
            bias=float(self.bias) if self.bias > 0 else False,
            seed=self.seed,
        )


def scaled_down(spec: SyntheticModelSpec, factor: int, roots: Optional[int] = None) -> SyntheticModelSpec:
    """The same model with ``num_features`` and ``hidden_dim`` (and the number of trees) divided by ``factor``:
    every other setting kept (for tests of a large configuration on a CPU)."""
    if factor < 1 or spec.num_features // factor < 2 or spec.hidden_dim // factor < 2:
        raise ConfigError(f"cannot divide {spec.num_features} features / {spec.hidden_dim} dims by {factor}")
    hierarchy = spec.hierarchy
    if hierarchy is not None:
        hierarchy = dataclasses.replace(hierarchy, total_root_nodes=roots or max(1, hierarchy.total_root_nodes // factor))
    return dataclasses.replace(spec, num_features=spec.num_features // factor, hidden_dim=spec.hidden_dim // factor,
                               hierarchy=hierarchy, hub_repo=None)


# --- building / loading ---------------------------------------------------------------------------
class HubUnavailableError(DataError):
    """The hub copy of a synthetic model cannot be had here (offline, not cached, or not found)."""


def load_from_hub(repo: str, device: str = "cpu"):
    """SAELens's hub loader (``SyntheticModel.from_pretrained``); HubUnavailableError when offline or missing."""
    from sae_lens.synthetic import SyntheticModel

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return SyntheticModel.from_pretrained(repo, device=device)
    except Exception as err:  # offline mode, no network, not cached, no such repo: all mean "not here"
        raise HubUnavailableError(
            f"cannot load the synthetic model {repo!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}); it needs network access (and HF_HUB_OFFLINE "
            "unset) or a cached copy. Use --model-source local to build it here from its documented configuration."
        ) from err


def saved_model_matches(folder: Path, spec: SyntheticModelSpec) -> bool:
    """Whether ``folder`` holds a SAELens-saved synthetic model built from ``spec``."""
    from sae_lens.synthetic import SYNTHETIC_MODEL_CONFIG_FILENAME, SYNTHETIC_MODEL_WEIGHTS_FILENAME

    config_path = folder / SYNTHETIC_MODEL_CONFIG_FILENAME
    if not config_path.is_file() or not (folder / SYNTHETIC_MODEL_WEIGHTS_FILENAME).is_file():
        return False
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(spec.saelens_config().to_dict()))


def build_model(spec: SyntheticModelSpec, source: str = "auto", device: str = "cpu",
                cache: Optional[Path] = None) -> tuple[Any, dict[str, Any]]:
    """The SAELens ``SyntheticModel`` of ``spec`` and where it came from.

    ``source``: "hub" (``spec.hub_repo``, an error if unreachable), "local" (built here from
    ``SyntheticModelConfig``, or read back from ``cache`` if that holds the same model), or "auto" (the hub
    when the spec names a repo and it is reachable, else local; the hub's error is recorded). A local build is
    saved to ``cache`` (SAELens's format) for later runs and re-evaluation."""
    from sae_lens.synthetic import SyntheticModel

    if source not in ("auto", "hub", "local"):
        raise ConfigError(f"model source must be 'auto', 'hub' or 'local', got {source!r}")
    info: dict[str, Any] = {"requested": source}
    if source in ("auto", "hub") and spec.hub_repo:
        try:
            model = load_from_hub(spec.hub_repo, device)
            info.update(used=f"hub:{spec.hub_repo}")
            return model, info
        except HubUnavailableError as err:
            if source == "hub":
                raise
            info["hub_error"] = str(err)
    elif source == "hub":
        raise ConfigError("model source 'hub' needs a hub_repo in the model settings; this setup has none")
    if cache is not None and saved_model_matches(cache, spec):
        model = SyntheticModel.load_from_disk(cache, device=device)
        info.update(used="local build (read back from its saved copy)", path=str(cache))
        return model, info
    with contextlib.redirect_stderr(io.StringIO()):  # SAELens's orthogonalisation progress bar
        model = SyntheticModel(spec.saelens_config(), device=device)
    info.update(used="local build from SyntheticModelConfig")
    if cache is not None:
        save_model(model, cache)
        info["path"] = str(cache)
    return model, info


def save_model(model: Any, folder: Path) -> None:
    """SAELens's own save (config, weights, hierarchy) into a fresh ``folder`` (no file of an earlier model
    left behind: a stale hierarchy.json would be read back with the new weights)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    model.save(folder)


# --- ground truth ------------------------------------------------------------------------------------
def feature_structure(model: Any) -> dict[str, torch.Tensor]:
    """Per ground-truth feature (F,): ``depth`` in its tree (-1: outside every tree), ``has_parent``,
    ``has_children``, ``firing_probability`` (the base probability the generator uses) and ``communality``
    (|f_i|^2: the share of its copula Gaussian's variance from the shared factors; 0 without correlation)."""
    F = model.cfg.num_features
    depth_F = torch.full((F,), -1, dtype=torch.long)
    has_parent_F = torch.zeros(F, dtype=torch.bool)
    has_children_F = torch.zeros(F, dtype=torch.bool)
    hierarchy = getattr(model, "hierarchy", None)
    if hierarchy is not None:
        stack = [(root, 0, False) for root in hierarchy.roots]
        while stack:
            node, depth, parent = stack.pop()
            if node.feature_index is not None:
                depth_F[node.feature_index] = depth
                has_parent_F[node.feature_index] = parent
                has_children_F[node.feature_index] = any(c.feature_index is not None for c in node.children)
            stack.extend((child, depth + 1, parent or node.feature_index is not None) for child in node.children)
    corr = getattr(model, "correlation_matrix", None)
    communality_F = (corr.correlation_factor.detach().float().cpu().square().sum(-1) if corr is not None
                     else torch.zeros(F))
    return {"depth": depth_F, "has_parent": has_parent_F, "has_children": has_children_F,
            "firing_probability": model.activation_generator.firing_probabilities.detach().float().cpu(),
            "communality": communality_F}
