"""Study presets as data: what the sweep trains, evaluates and analyses.

* ``paper``   -- the seed paper's setup (gelu-1l, layer 0 resid_post, dict 2048, 20k steps, bf16,
  2,500 x 128 buffer, batch 192, lr 8e-4, k in {64..512}, TopK vs VSAETopK (paper preset)).
  Needs a GPU box with internet (model and c4-code from the hub).
* ``offline`` -- the same study on the embedded default model (d_model 256, so dict 1024 keeps the
  paper's 4x and k/dict ratios 1/32..1/4); finishes on a 2-core CPU in about 15 minutes.
* ``smoke``   -- a tiny version for the tests.

``python -m experiments.sweep --preset NAME`` runs one; ``--set key=value`` overrides a field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from saebench_adapters.run_evals import EVALS, PRESETS as EVAL_PRESETS

from dictionary_learning_ext import get_architecture
from dictionary_learning_ext.config import ConfigError, parse_value


@dataclass(frozen=True)
class StudyPreset:
    name: str
    description: str
    architectures: tuple[str, ...]
    """``name[:preset]`` as on the train CLI; k-based ones are swept over ``ks``."""
    ks: tuple[int, ...]
    model: str = "default"
    layer: int = 0
    text: str = "local"
    dict_size: int = 1024
    steps: int = 2000
    batch_size: int = 192
    n_ctxs: int = 500
    ctx_len: int = 128
    lr: Optional[float] = None
    """One learning rate for every trainer (None: each architecture's default)."""
    autocast_dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    overrides: tuple[str, ...] = ()
    """``[ARCH.]KEY=VALUE`` trainer overrides, as ``--set`` on the train CLI."""
    evals: tuple[str, ...] = EVALS
    eval_preset: str = "quick"
    # analyses
    analysis_contexts: int = 200
    """Contexts of ``ctx_len`` tokens encoded for the alive counts, the latent map and feature pages."""
    unique_window: int = 20_000
    """The post's count: unique latents firing over this many activations."""
    n_clusters: int = 10
    feature_pages: int = 4
    """Latents per SAE that get a feature page."""
    page_examples: int = 8
    """Top-activating contexts shown per feature page."""
    digits: bool = False
    """Also run the MP-SAE digits study (``experiments.digits_study``) as a report section."""
    digits_quick: bool = False
    """The digits study's seconds-long version (tests)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form notes recorded in results.json (e.g. the paper's table to compare against)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.architectures and not self.digits:
            raise ConfigError(f"preset {self.name!r}: no architectures and no digits study: nothing to run")
        for spec in self.architectures:
            name, _, preset = spec.partition(":")
            arch = get_architecture(name)
            if preset:
                try:
                    arch.preset_values(preset)
                except ConfigError as err:
                    raise ConfigError(f"study preset {self.name!r}: {err}") from None
        for name in ("dict_size", "steps", "batch_size", "n_ctxs", "ctx_len", "analysis_contexts", "unique_window",
                     "n_clusters", "page_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"preset {self.name!r}: {name} must be a positive int, got {value!r}")
        if not isinstance(self.feature_pages, int) or self.feature_pages < 0:
            raise ConfigError(f"preset {self.name!r}: feature_pages must be an int >= 0, got {self.feature_pages!r}")
        if not self.ks or any(not isinstance(k, int) or not 0 < k <= self.dict_size for k in self.ks):
            raise ConfigError(f"preset {self.name!r}: ks {self.ks} must be ints in [1, dict_size={self.dict_size}]")
        unknown = [e for e in self.evals if e not in EVALS]
        if unknown:
            raise ConfigError(f"preset {self.name!r}: unknown evals {unknown}; choose from {list(EVALS)}")
        if self.eval_preset not in EVAL_PRESETS:
            raise ConfigError(f"preset {self.name!r}: eval_preset must be one of {list(EVAL_PRESETS)}")
        if self.autocast_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"preset {self.name!r}: autocast_dtype must be float32 or bfloat16")

    def replace(self, **changes: Any) -> "StudyPreset":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown preset field(s) {unknown}; fields: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: list[str]) -> "StudyPreset":
        """Apply ``key=value`` strings (JSON values; lists become tuples)."""
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=500")
            value = parse_value(raw)
            changes[key] = tuple(value) if isinstance(value, list) else value
        return self.replace(**changes)

    def on_setup(self, setup: "StudyPreset") -> "StudyPreset":
        """This study's SAEs and analyses on another preset's model, data, sizes and hardware
        (``--setup paper`` runs e.g. the ablation on gelu-1l with the paper's training setup)."""
        return self.replace(**{name: getattr(setup, name) for name in SETUP_FIELDS},
                            description=f"{self.description} [on the {setup.name!r} setup]")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# The paper's SAEBench core table on gelu-1l (method.md §2), for the report's comparison.
PAPER_TABLE = {
    64: {"topk_fve": 0.875, "topk_alive": 1.00, "vsae_fve": 0.81, "vsae_alive": 0.13},
    128: {"topk_fve": 0.90, "topk_alive": 1.00, "vsae_fve": 0.88, "vsae_alive": 0.25},
    256: {"topk_fve": 0.95, "topk_alive": 0.98, "vsae_fve": 0.94, "vsae_alive": 0.49},
    512: {"topk_fve": 0.996, "topk_alive": 1.00, "vsae_fve": 0.98, "vsae_alive": 0.90},
}

# What ``--setup`` takes from another preset: everything about the model, data, scale and hardware.
SETUP_FIELDS = ("model", "layer", "text", "dict_size", "ks", "steps", "batch_size", "n_ctxs", "ctx_len", "lr",
                "autocast_dtype", "device", "eval_preset", "analysis_contexts")

PRESETS: dict[str, StudyPreset] = {}


def register_preset(preset: StudyPreset) -> StudyPreset:
    if preset.name in PRESETS:
        raise ValueError(f"study preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> StudyPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown study preset {name!r}; known: {sorted(PRESETS)}") from None


register_preset(StudyPreset(
    name="paper",
    description="The seed paper's setup: gelu-1l layer 0 resid_post, dict 2048, 20k steps, bf16, TopK vs "
                "VSAETopK (authors' settings, noise really sampled). Needs a GPU and the hub.",
    architectures=("top_k", "vsae_topk:paper"),
    ks=(64, 128, 256, 512),
    model="gelu-1l",
    text="hf:NeelNanda/c4-code-tokenized-2b:tokens",
    dict_size=2048,
    steps=20_000,
    batch_size=192,
    n_ctxs=2500,
    ctx_len=128,
    lr=8e-4,
    autocast_dtype="bfloat16",
    device="cuda",
    eval_preset="full",
    analysis_contexts=1000,
    feature_pages=8,
    extra={"paper_table": PAPER_TABLE},
))

register_preset(StudyPreset(
    name="offline",
    description="The paper's study scaled to the embedded default model (d_model 256, dict 1024 = 4x, "
                "k/dict from 1/32 to 1/4 as in the paper): TopK vs VSAETopK with the authors' settings "
                "(noise really sampled), on the local stdlib corpus.",
    architectures=("top_k", "vsae_topk:paper"),
    ks=(32, 64, 128, 256),
    dict_size=1024,
    steps=1500,
    batch_size=192,
    n_ctxs=500,
    lr=8e-4,
    evals=("core", "scr", "tpp", "sparse_probing", "absorption"),
    analysis_contexts=160,
    extra={"paper_table": PAPER_TABLE, "paper_k_equivalent": {32: 64, 64: 128, 128: 256, 256: 512}},
))

register_preset(StudyPreset(
    name="smoke",
    description="A minute-long end-to-end check of the sweep: two architectures, two k, few steps.",
    architectures=("top_k", "vsae_topk"),
    ks=(8, 16),
    dict_size=128,
    steps=60,
    batch_size=64,
    n_ctxs=40,
    ctx_len=64,
    evals=("core", "sparse_probing"),
    analysis_contexts=24,
    unique_window=1000,
    n_clusters=4,
    feature_pages=2,
    page_examples=3,
))

register_preset(StudyPreset(
    name="digits",
    description="Only the controlled MP-SAE study on sklearn's 8x8 digits (standard, TopK, VSAETopK, MP-SAE "
                "at matched L0); no language model.",
    architectures=(),
    ks=(10,),
    evals=(),
    digits=True,
))

# Issue 7: TopK, the authors' VSAETopK, each remedy alone on top of it, and the recommended default.
ABLATION_VARIANTS = ("paper+no_sampling", "paper+auxk", "paper+kl_selected", "paper+free_bits", "paper+learned_var",
                     "paper+select_mean", "paper+kl_per_dim", "paper+resample")
register_preset(StudyPreset(
    name="ablation",
    description="Which change keeps VSAETopK's latents alive without losing reconstruction: TopK, the paper-setting "
                "VSAETopK, each remedy alone on top of it, and the recommended VSAETopK default, at several k on the "
                "embedded default model. Run it on gelu-1l with --setup paper.",
    architectures=("top_k", "vsae_topk:paper", *(f"vsae_topk:{v}" for v in ABLATION_VARIANTS), "vsae_topk"),
    ks=(32, 64, 128),
    dict_size=1024,
    steps=1500,
    lr=8e-4,
    evals=("core", "scr", "tpp", "sparse_probing"),
    analysis_contexts=800,
    feature_pages=0,
))

# Issue 6: MP-SAE next to TopK and VSAETopK on the default LM, plus the controlled digits study.
register_preset(StudyPreset(
    name="mp",
    description="Matching-pursuit SAE on the embedded default model beside TopK and the recommended VSAETopK "
                "(k/dict 1/64 to 1/16; MP-SAE's encoder costs k dense passes, so k stays small on a CPU), "
                "with the controlled digits study as a section.",
    architectures=("top_k", "vsae_topk", "mp_sae"),
    ks=(16, 32, 64),
    dict_size=1024,
    steps=1500,
    lr=8e-4,
    evals=("core", "scr", "tpp", "sparse_probing"),
    analysis_contexts=160,
    feature_pages=2,
    digits=True,
))
