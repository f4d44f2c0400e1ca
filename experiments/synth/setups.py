"""Named setups of the synthetic study: a synthetic model (``model.SyntheticModelSpec``) plus what is trained
on it and how it is scored (``TrainingSpec``), and the published SynthSAEBench-16k numbers.

* ``synth`` -- the default: a SynthSAEBench-16k-style model scaled to a 2-core CPU (every family and
  parameter of SynthSAEBench-16k kept except the sizes; see ``SYNTH_MODEL``), all eight SAEs, three L0 targets.
* ``synthsaebench16k`` -- SynthSAEBench-16k exactly as documented (or its hub copy), width 4096, 200M samples,
  lr 3e-4, batch 1024: the published configuration, for a GPU.

``Setup.quick()`` is a seconds-long version of a setup (for tests); ``Setup.with_overrides`` applies
``model.KEY=VALUE`` / ``training.KEY=VALUE`` strings (nested: ``model.firing.max_prob=0.2``), refusing
unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from dictionary_learning_ext.config import ConfigError, check_field_types, dataclass_from_dict, parse_value
from dictionary_learning_ext.registry import parse_spec

from experiments.training.protocol import PROTOCOL

from .model import (
    CorrelationSpec,
    FiringSpec,
    HierarchySpec,
    MagnitudeSpec,
    OrthogonalizationSpec,
    SyntheticModelSpec,
    scaled_down,
)

ARCHITECTURES = ("standard", "top_k", "batch_top_k", "vsae_topk", "vsae_topk:paper", "vsae_topk:authors", "vsae",
                 "mp_sae")
"""Every SAE of the study, as ``name[:variant]``: dictionary_learning's standard (ReLU + L1), TopK and BatchTopK;
this project's VSAETopK (the recommended default, the paper's setting, the authors' code), VSAE and MP-SAE."""

PROTOCOL_FIELDS = ("lr", "warmup_frac", "decay_frac", "auxk_alpha", "dead_window_tokens", "normalize_activations")
SYNTH_PROTOCOL = {**{k: PROTOCOL[k] for k in PROTOCOL_FIELDS}, "auxk_alpha": 0.0}
"""The studies' training protocol (``experiments.training.protocol.PROTOCOL``: lr 8e-4, 5% warm-up, linear
decay from 80%, dead window 20,000 tokens, activations normalised to unit mean squared norm) with auxK off
for every SAE: standard, VSAE and MP-SAE have no auxK, and one protocol must apply to all (as in the ``mp``
study). A variant that keeps its own value (``vsae_topk:authors``: the authors' schedule and auxK) says so in
results.json ``settings.departures``."""


@dataclass(frozen=True)
class TrainingSpec:
    """What is trained on the synthetic model and how it is scored."""

    dict_size: int
    """Latents per SAE (narrower than the number of true features, as SynthSAEBench trains 4096 for 16,384)."""
    steps: int
    """Training steps."""
    batch_size: int
    """Activations per step (drawn fresh from the synthetic model: no sample is seen twice)."""
    l0_targets: tuple[int, ...]
    """Target L0s: the k of the k-sparse SAEs; the L1 penalty of the L1-penalised ones is tuned to them."""
    l1_grid: Mapping[str, tuple[float, ...]]
    """Per L1-penalised architecture, the penalties of the calibration grid (first seed); each target then gets
    the penalty interpolated (log-log) to it, one refinement run per target, and the closest run's penalty is
    used for every seed."""
    architectures: tuple[str, ...] = ARCHITECTURES
    """SAEs, ``name[:variant]`` as registered (``dictionary_learning_ext.ARCHITECTURES``)."""
    lr: Optional[float] = None
    """Learning rate for every SAE (None: the studies' protocol, 8e-4)."""
    eval_samples: int = 16_384
    """Held-out samples every SAE is scored on (the same ones for every SAE)."""
    eval_batch_size: int = 2048
    """Samples per eval batch."""
    eval_seed: int = 1_000_000
    """Seeds the held-out samples (training data is seeded by the SAE seed: disjoint streams)."""
    norm_factor_batches: int = 20
    """Batches used to estimate the activation normalisation factor (folded back into the saved weights)."""
    baseline: str = "top_k"
    """The SAE the claims compare against."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        where = "TrainingSpec"
        for name in ("dict_size", "steps", "batch_size", "eval_samples", "eval_batch_size", "norm_factor_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be a positive int, got {getattr(self, name)}")
        if self.eval_seed < 0:
            raise ConfigError(f"{where}.eval_seed must be >= 0, got {self.eval_seed}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"{where}.lr must be a positive finite number, got {self.lr}")
        if not self.l0_targets:
            raise ConfigError(f"{where}.l0_targets is empty; give at least one target L0")
        if len(set(self.l0_targets)) != len(self.l0_targets) or list(self.l0_targets) != sorted(self.l0_targets):
            raise ConfigError(f"{where}.l0_targets {list(self.l0_targets)} must be distinct and increasing")
        if not self.architectures:
            raise ConfigError(f"{where}.architectures is empty")
        if len(set(self.architectures)) != len(self.architectures):
            raise ConfigError(f"{where}.architectures {list(self.architectures)} lists an SAE twice")
        for spec in self.architectures:
            arch, _ = parse_spec(spec)  # unknown architecture / variant: ConfigError naming it
            if not self.has_k(spec) and "l1_penalty" not in arch.field_names:
                raise ConfigError(f"{where}: {spec} has neither a k nor an l1_penalty; the study cannot match its L0")
        for target in self.l0_targets:
            if target < 1 or target > self.dict_size:
                spec = next((s for s in self.architectures if self.has_k(s)), self.architectures[0])
                raise ConfigError(f"{where}: L0 target {target} cannot be reached by {spec} with {self.dict_size} latents "
                                  f"(k must be in [1, dict_size={self.dict_size}]); lower the target or widen the SAE")
        for spec in self.l1_based():
            grid = self.l1_grid.get(parse_spec(spec)[0].name)
            if grid is None or len(grid) < 2 or len(set(grid)) != len(grid) or any(not 0 < v < math.inf for v in grid):
                raise ConfigError(f"{where}.l1_grid[{parse_spec(spec)[0].name!r}] must hold at least two distinct positive "
                                  f"penalties to interpolate between, got {grid!r}")
        unused = sorted(set(self.l1_grid) - {parse_spec(s)[0].name for s in self.l1_based()})
        if unused:
            raise ConfigError(f"{where}.l1_grid names {unused}, which are not L1-penalised SAEs of this setup")
        if self.baseline not in self.architectures:
            raise ConfigError(f"{where}.baseline {self.baseline!r} is not one of the setup's SAEs {list(self.architectures)}")

    @staticmethod
    def has_k(spec: str) -> bool:
        return "k" in parse_spec(spec)[0].field_names

    def k_based(self) -> list[str]:
        return [s for s in self.architectures if self.has_k(s)]

    def l1_based(self) -> list[str]:
        return [s for s in self.architectures if not self.has_k(s)]

    def protocol(self) -> dict[str, Any]:
        """The training protocol every SAE gets (``RunConfig`` protocol fields)."""
        return {**SYNTH_PROTOCOL, **({"lr": self.lr} if self.lr is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["l1_grid"] = {k: list(v) for k, v in self.l1_grid.items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainingSpec":
        if not isinstance(values, Mapping):
            raise ConfigError(f"TrainingSpec must be given as a mapping of its fields, got {values!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if isinstance(values.get("l1_grid"), Mapping):
            values["l1_grid"] = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values["l1_grid"].items()}
        return dataclass_from_dict(cls, values)


@dataclass(frozen=True)
class Setup:
    name: str
    """``--setup NAME``."""
    description: str
    """One paragraph for results.json and the report."""
    model: SyntheticModelSpec
    """The synthetic model."""
    training: TrainingSpec
    """The SAEs and their training and scoring."""
    published: Mapping[str, Any] = field(default_factory=dict)
    """Published numbers this setup reproduces (SynthSAEBench-16k's table), by L0 then SAE."""
    quick_of: Optional[str] = None
    """Set on a ``quick()`` version: the setup it shrinks."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        m, t = self.model, self.training
        where = f"setup {self.name!r}"
        if t.dict_size > m.num_features:
            raise ConfigError(
                f"{where}: dict_size {t.dict_size} is larger than the synthetic model's {m.num_features} true features; "
                "this study scores SAEs narrower than the ground truth (SynthSAEBench: 4096 latents for 16,384 "
                "features), so choose training.dict_size <= model.num_features")
        for spec in t.architectures:
            if parse_spec(spec)[0].name == "mp_sae" and max(t.l0_targets) > m.hidden_dim:
                raise ConfigError(
                    f"{where}: L0 target {max(t.l0_targets)} cannot be reached by {spec} in {m.hidden_dim} dimensions "
                    "(matching pursuit adds at most hidden_dim independent atoms); lower the target")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model.to_dict(),
                "training": self.training.to_dict(), "published": dict(self.published), "quick_of": self.quick_of}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Setup":
        """A setup as ``to_dict`` wrote it (results.json ``settings.setup``)."""
        values = dict(values)
        values["model"] = SyntheticModelSpec.from_dict(values["model"])
        values["training"] = TrainingSpec.from_dict(values["training"])
        return dataclass_from_dict(cls, values)

    def with_overrides(self, items: tuple[str, ...] | list[str]) -> "Setup":
        """``model.KEY=VALUE`` / ``training.KEY=VALUE`` strings (JSON values; nested keys with dots)."""
        model, training = self.model.to_dict(), self.training.to_dict()
        for item in items:
            key, sep, raw = item.partition("=")
            part, _, path = key.partition(".")
            if not sep or not path or part not in ("model", "training"):
                raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE or training.KEY=VALUE "
                                  "(e.g. --set model.hidden_dim=64 --set training.steps=500)")
            target = model if part == "model" else training
            *parents, leaf = path.split(".")
            for name in parents:
                if not isinstance(target.get(name), dict):
                    raise ConfigError(f"--set {item!r}: {part}.{name} is not a group of settings "
                                      f"(groups: {sorted(k for k, v in target.items() if isinstance(v, dict))})")
                target = target[name]
            target[leaf] = parse_value(raw)
        return dataclasses.replace(self, model=SyntheticModelSpec.from_dict(model),
                                   training=TrainingSpec.from_dict(training))

    def quick(self) -> "Setup":
        """A seconds-long version (tests): the setup's model divided down (or the default's tiny model), every
        SAE, two targets, few steps."""
        if self.quick_of is not None:
            return self
        if self.name == "synthsaebench16k":
            model = scaled_down(self.model, 16, roots=4)  # 1024 features in 48 dims, 4 trees
            dict_size, targets = 64, (4, 8)
        else:
            model = dataclasses.replace(
                self.model, num_features=256, hidden_dim=32,
                hierarchy=dataclasses.replace(self.model.hierarchy, total_root_nodes=2)
                if self.model.hierarchy is not None else None,
                orthogonalization=OrthogonalizationSpec(num_steps=10, lr=self.model.orthogonalization.lr)
                if self.model.orthogonalization is not None else None)
            dict_size, targets = 64, (3, 6)
        training = dataclasses.replace(
            # 220 steps: vsae_topk:authors warms its learning rate up over max(200, 2% of the steps).
            self.training, dict_size=dict_size, steps=220, batch_size=64, l0_targets=targets,
            l1_grid={name: (0.03, 0.3) for name in self.training.l1_grid}, eval_samples=1024, eval_batch_size=512,
            norm_factor_batches=4)
        return dataclasses.replace(self, name=f"{self.name}-quick", model=model, training=training, quick_of=self.name,
                                   description=f"{self.description} [quick: a seconds-long version for tests]")


# --- the setups ----------------------------------------------------------------------------------------
SYNTHSAEBENCH_16K = SyntheticModelSpec(
    num_features=16_384, hidden_dim=768,
    firing=FiringSpec(exponent=0.5, max_prob=0.4, min_prob=5e-4),
    hierarchy=HierarchySpec(total_root_nodes=128, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                            mutually_exclusive_min_depth=0, compensate_probabilities=True,
                            scale_children_by_parent=True),
    correlation=CorrelationSpec(rank=25, correlation_scale=0.1),
    orthogonalization=OrthogonalizationSpec(num_steps=100, lr=3e-4),
    magnitudes=MagnitudeSpec(mean_start=5.0, mean_end=4.0, std_mean=0.5, std_std=0.5),
    bias=0.5, seed=42, hub_repo="decoderesearch/synth-sae-bench-16k-v2",
)
"""SynthSAEBench-16k as documented (SAELens docs ``synth_sae_bench.md`` and the authors'
``create_synth_bench_16k_model.py``): true L0 ~34, ~25 over the 4096 most frequent features."""

SYNTH_MODEL = dataclasses.replace(
    SYNTHSAEBENCH_16K, num_features=1024, hidden_dim=64,
    hierarchy=dataclasses.replace(SYNTHSAEBENCH_16K.hierarchy, total_root_nodes=8), hub_repo=None)
"""SynthSAEBench-16k divided by 16 in features (1024) and 12 in dimensions (64), trees by 16 (8 roots of 85
features: 2/3 of the features in trees, as in 16k); firing, hierarchy, correlation, orthogonalisation, magnitude
and bias settings unchanged. Same width ratio (SAE = features / 4). Denser than 16k per dimension (true L0 ~7 in
64 dims against ~34 in 768): a smaller model with the published firing curve is what a 2-core CPU trains to a
useful MCC in minutes."""

# Published SynthSAEBench-16k results (SAELens docs, synth_sae_bench.md, "Raw results for SynthSAEBench-16k at
# selected L0s"): mean and standard deviation over 5 seeds; 200M samples, width 4096, lr 3e-4, batch 1024.
PUBLISHED_16K = {
    "source": "SAELens docs, SynthSAEBench (synth_sae_bench.md): Chanin & Garriga-Alonso 2026, arXiv 2602.14687",
    "spread": "standard deviation over 5 seeds (not a confidence interval)",
    "equivalents": {"BatchTopK": "batch_top_k", "MatchPursuit": "mp_sae", "Standard L1": "standard",
                    "Matryoshka": None, "JumpReLU": None},
    "by_l0": {
        "25": {"BatchTopK": {"f1": (0.7316, 0.0010), "mcc": (0.7574, 0.0003), "uniqueness": (0.9837, 0.0015),
                             "explained_variance": (0.7923, 0.0003)},
               "Matryoshka": {"f1": (0.8793, 0.0021), "mcc": (0.7927, 0.0006), "uniqueness": (0.9987, 0.0005),
                              "explained_variance": (0.7792, 0.0004)},
               "MatchPursuit": {"f1": (0.4464, 0.0044), "mcc": (0.6930, 0.0030), "uniqueness": (0.8281, 0.0069),
                                "explained_variance": (0.8351, 0.0003)},
               "Standard L1": {"f1": (0.5562, 0.0020), "mcc": (0.6039, 0.0012), "uniqueness": (0.8976, 0.0021),
                               "explained_variance": (0.7654, 0.0001)},
               "JumpReLU": {"f1": (0.7317, 0.0034), "mcc": (0.7527, 0.0009), "uniqueness": (0.9885, 0.0010),
                            "explained_variance": (0.7951, 0.0004)}},
        "20": {"BatchTopK": {"f1": (0.8183, 0.0011), "mcc": (0.7526, 0.0007), "uniqueness": (0.9760, 0.0028),
                             "explained_variance": (0.7889, 0.0002)},
               "Matryoshka": {"f1": (0.8601, 0.0016), "mcc": (0.7455, 0.0021), "uniqueness": (0.9874, 0.0020),
                              "explained_variance": (0.7699, 0.0002)},
               "MatchPursuit": {"f1": (0.4439, 0.0024), "mcc": (0.6748, 0.0028), "uniqueness": (0.7552, 0.0026),
                                "explained_variance": (0.8267, 0.0003)},
               "Standard L1": {"f1": (0.5777, 0.0012), "mcc": (0.5834, 0.0015), "uniqueness": (0.8528, 0.0055),
                               "explained_variance": (0.7501, 0.0009)},
               "JumpReLU": {"f1": (0.8241, 0.0041), "mcc": (0.7434, 0.0015), "uniqueness": (0.9781, 0.0029),
                            "explained_variance": (0.7906, 0.0005)}},
    },
}

SETUPS: dict[str, Setup] = {}


def register_setup(setup: Setup) -> Setup:
    if setup.name in SETUPS:
        raise ValueError(f"setup {setup.name!r} registered twice")
    SETUPS[setup.name] = setup
    return setup


def get_setup(name: str) -> Setup:
    try:
        return SETUPS[name]
    except KeyError:
        raise ConfigError(f"unknown synthetic setup {name!r}; known: {sorted(SETUPS)}") from None


register_setup(Setup(
    name="synth",
    description=(
        "SynthSAEBench-style ground truth scaled to a 2-core CPU: 1,024 known features in 64 dimensions (Zipfian "
        "firing 0.4 to 5e-4 with exponent 0.5; 8 trees of depth 3 and branching 4 with mutually exclusive children "
        "scaled by their parent; rank-25 correlations; orthogonalised feature vectors; magnitudes 5 to 4 with "
        "folded-normal spread; bias 0.5), SAEs of 256 latents, every SAE under one protocol on the same batches, "
        "scored by SAELens's eval_sae_on_synthetic_data on the same held-out samples."),
    model=SYNTH_MODEL,
    training=TrainingSpec(dict_size=256, steps=2500, batch_size=512, l0_targets=(4, 6, 9),
                          l1_grid={"standard": (0.25, 0.5, 1.0), "vsae": (0.001, 0.01, 0.1)}),
))

register_setup(Setup(
    name="synthsaebench16k",
    description=(
        "SynthSAEBench-16k as published (16,384 features in 768 dimensions; the hub copy "
        "decoderesearch/synth-sae-bench-16k-v2 when reachable, else built here from its documented configuration), "
        "SAEs of 4,096 latents, 200M samples (195,312 steps of 1,024), lr 3e-4, at L0 20 and 25: the published "
        "BatchTopK / Standard L1 / MatchPursuit rows beside VSAETopK and this project's MP-SAE. Needs a GPU "
        "(--device cuda)."),
    model=SYNTHSAEBENCH_16K,
    training=TrainingSpec(dict_size=4096, steps=200_000_000 // 1024, batch_size=1024, l0_targets=(20, 25),
                          architectures=("standard", "top_k", "batch_top_k", "vsae_topk", "vsae_topk:paper", "mp_sae"),
                          l1_grid={"standard": (0.5, 1.5, 5.0)}, lr=3e-4, eval_samples=1_000_000,
                          eval_batch_size=8192, norm_factor_batches=100),
    published=PUBLISHED_16K,
))
