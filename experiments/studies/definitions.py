"""Study definitions as data: what the sweep trains (one ``RunConfig``), evaluates and analyses, and
what its SAEs are compared against.

* ``paper``   -- the seed paper's setup (gelu-1l, layer 0 resid_post, dict 2048, 20k steps, bf16,
  2,500 x 128 buffer, batch 192, lr 8e-4, k in {64..512}, TopK vs VSAETopK (``paper`` variant)).
  Needs a GPU box with internet (model and c4-code from the hub).
* ``offline`` -- the same study on the embedded default model (d_model 256, so dict 1024 keeps the
  paper's 4x and k/dict ratios 1/32..1/4).
* ``ablation``, ``mp``, ``digits`` -- see their descriptions; ``smoke`` -- a tiny version for the tests.

``python -m experiments.sweep --study NAME`` runs one; ``--set key=value`` overrides a field of the study
or of its run configuration (``--set steps=500``, ``--set 'ks=[32,64]'``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from dictionary_learning_ext.config import ConfigError, check_field_types, dataclass_from_dict, parse_value
from saebench_adapters.run_evals import EVALS

from experiments.training.protocol import PROTOCOL
from experiments.training.config import PROTOCOL_FIELDS, RunConfig

EVAL_PROFILES = ("quick", "full")


@dataclass(frozen=True)
class Study:
    name: str
    """Short name (``--study NAME``)."""
    description: str
    """One paragraph for the report."""
    run: RunConfig
    """The training run: every SAE of the study on one activation buffer, under one protocol (its save_dir and
    seed are set by the sweep, once per seed)."""
    seeds: tuple[int, ...] = (0,)
    """Every SAE is trained once per seed (weights, noise and data order; every SAE of a seed sees the same
    data); results are means over seeds with 95% intervals."""
    units: Literal["seed", "sae"] = "seed"
    """How training is split into runs: one run per seed (every SAE of a seed on one activation buffer: one
    language-model pass per seed), or one run per SAE and seed (one pass each, unless the run reads cached
    activations, but many units to spread over shards). The same SAEs and numbers either way."""
    evals: tuple[str, ...] = EVALS
    """SAEBench evals run on every SAE."""
    eval_profile: str = "quick"
    """SAEBench eval sizes: "quick" (minutes on a CPU) or "full" (SAEBench's defaults)."""
    analysis_contexts: int = 200
    """Contexts of ctx_len tokens encoded for the alive counts, the latent map and feature pages."""
    unique_window: int = 20_000
    """The post's count: unique latents firing over this many activations."""
    n_clusters: int = 10
    """KMeans clusters of the latent map."""
    feature_pages: int = 4
    """Latents per SAE that get a feature page."""
    page_examples: int = 8
    """Top-activating contexts shown per feature page."""
    digits: bool = False
    """Also run the MP-SAE digits study (``experiments.digits``) as a report section."""
    digits_quick: bool = False
    """The digits study's seconds-long version (tests)."""
    synth: Optional[str] = None
    """Also run the ground-truth study on synthetic data with known features (``experiments.synth``) with this
    setup (``synth``, or ``synthsaebench16k`` on a GPU), over the study's seeds, as a report section."""
    synth_quick: bool = False
    """The synthetic study's seconds-long version (tests)."""
    baseline: Optional[str] = "top_k"
    """The SAE label (name[:variant]) every comparison and verdict is made against."""
    paper_reference: Optional[str] = None
    """The SAE label set beside the paper's table (with ``paper_table``)."""
    paper_table: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    """The paper's published numbers by the paper's k (keys topk_fve, topk_alive, vsae_fve, vsae_alive)."""
    paper_k_equivalent: Mapping[int, int] = field(default_factory=dict)
    """This study's k -> the paper's k at the same k/dict ratio."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        where = f"study {self.name!r}"
        if not self.run.architectures and not self.digits and not self.synth:
            raise ConfigError(f"{where}: no architectures, no digits and no synth study: nothing to run")
        if self.synth is not None:
            from experiments.synth.setups import get_setup

            get_setup(self.synth)  # an unknown setup is named now, not after training
        for name in ("analysis_contexts", "unique_window", "n_clusters", "page_examples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.feature_pages < 0:
            raise ConfigError(f"{where}: feature_pages must be an int >= 0, got {self.feature_pages!r}")
        if self.run.dict_size is None:
            raise ConfigError(f"{where}: the run needs an explicit dict_size (the report compares at fixed size)")
        if not self.seeds:
            raise ConfigError(f"{where}: seeds is empty; give at least one seed, e.g. --set 'seeds=[0,1,2]'")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"{where}: seeds {list(self.seeds)} must be distinct ints >= 0, e.g. --set 'seeds=[0,1,2]'")
        if self.run.seed != 0:
            raise ConfigError(f"{where}: a study sets its seeds with seeds=[...], not the run's seed "
                              f"({self.run.seed}); e.g. --set 'seeds=[{self.run.seed}]'")
        missing = [name for name in PROTOCOL_FIELDS if getattr(self.run, name) is None]
        if self.run.architectures and missing:
            raise ConfigError(f"{where}: the training protocol leaves {missing} to each architecture; a study fixes "
                              "them for every SAE it compares (e.g. --set warmup_frac=0.05)")
        unknown = [e for e in self.evals if e not in EVALS]
        if unknown:
            raise ConfigError(f"{where}: unknown evals {unknown}; choose from {list(EVALS)}")
        if self.eval_profile not in EVAL_PROFILES:
            raise ConfigError(f"{where}: eval_profile must be one of {list(EVAL_PROFILES)}")
        labels = self.labels()
        for role in ("baseline", "paper_reference"):
            label = getattr(self, role)
            if label is not None and labels and label not in labels:
                raise ConfigError(f"{where}: {role} {label!r} is not one of its SAEs {labels}")

    def labels(self) -> list[str]:
        """The SAE labels the run trains, in order, without repeats."""
        from experiments.training.plan import plan_trainers

        return list(dict.fromkeys(t.label for t in plan_trainers(self.run)))

    # --- changing a study -------------------------------------------------------------------
    def replace(self, **changes: Any) -> "Study":
        """Change study fields or, by their names, fields of the run configuration (``steps=500``)."""
        study_fields = {f.name for f in dataclasses.fields(self)}
        run_fields = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(changes) - study_fields - run_fields)
        if unknown:
            raise ConfigError(f"unknown study field(s) {unknown}; fields: {sorted(study_fields - {'run'})} "
                              f"and the run's: {sorted(run_fields)}")
        run_changes = {k: v for k, v in changes.items() if k in run_fields and k not in study_fields}
        study_changes = {k: v for k, v in changes.items() if k in study_fields}
        run = study_changes.pop("run", self.run)
        if run_changes:
            run = run.replace(**run_changes)
        study_changes = {k: tuple(v) if isinstance(v, list) else v for k, v in study_changes.items()}
        return dataclasses.replace(self, run=run, **study_changes)

    def with_overrides(self, items: list[str]) -> "Study":
        """Apply ``key=value`` strings (JSON values; lists become tuples). ``ARCH.KEY=VALUE`` (an architecture's
        config field, e.g. ``vsae_topk.beta=0.5``) is added to the run's trainer overrides."""
        from dictionary_learning_ext.registry import ARCHITECTURES

        changes: dict[str, Any] = {}
        trainer_overrides: list[str] = []
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=500")
            if key.partition(".")[0] in ARCHITECTURES:
                trainer_overrides.append(item)
                continue
            changes[key.removeprefix("run.")] = parse_value(raw)
        if trainer_overrides:
            changes["overrides"] = (*changes.get("overrides", self.run.overrides), *trainer_overrides)
        return self.replace(**changes)

    def on_setup(self, setup: "Study") -> "Study":
        """This study's SAEs and analyses on another study's model, data, sizes and hardware
        (``--setup paper`` runs e.g. the ablation on gelu-1l with the paper's training setup)."""
        return self.replace(**{name: getattr(setup.run, name) for name in SETUP_RUN_FIELDS},
                            **{name: getattr(setup, name) for name in SETUP_STUDY_FIELDS},
                            description=f"{self.description} [on the {setup.name!r} setup]")

    # --- as stored in study.json / results.json -----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["run"] = self.run.to_dict()
        return {k: list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
                for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Study":
        values = dict(values)
        values["run"] = RunConfig.from_dict(values["run"])
        for key in ("paper_table", "paper_k_equivalent"):  # JSON turned the int keys into strings
            values[key] = {int(k): v for k, v in (values.get(key) or {}).items()}
        return dataclass_from_dict(cls, {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# What ``--setup`` takes from another study: everything about the model, data, scale and hardware.
SETUP_RUN_FIELDS = ("model", "layer", "text", "dict_size", "ks", "steps", "batch_size", "n_ctxs", "ctx_len", "lr",
                    "autocast_dtype", "device")
SETUP_STUDY_FIELDS = ("eval_profile", "analysis_contexts")

STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    if study.name in STUDIES:
        raise ValueError(f"study {study.name!r} registered twice")
    STUDIES[study.name] = study
    return study


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise ConfigError(f"unknown study {name!r}; known: {sorted(STUDIES)}") from None



# The paper's SAEBench core table on gelu-1l, for the report's comparison.
PAPER_TABLE = {
    64: {"topk_fve": 0.875, "topk_alive": 1.00, "vsae_fve": 0.81, "vsae_alive": 0.13},
    128: {"topk_fve": 0.90, "topk_alive": 1.00, "vsae_fve": 0.88, "vsae_alive": 0.25},
    256: {"topk_fve": 0.95, "topk_alive": 0.98, "vsae_fve": 0.94, "vsae_alive": 0.49},
    512: {"topk_fve": 0.996, "topk_alive": 1.00, "vsae_fve": 0.98, "vsae_alive": 0.90},
}

register_study(Study(
    name="paper",
    description="The seed paper's setup: gelu-1l layer 0 resid_post, dict 2048, 20k steps, bf16, TopK vs "
                "VSAETopK (the paper's settings, noise really sampled). Needs a GPU and the hub.",
    run=RunConfig(
        architectures=("top_k", "vsae_topk:paper"), ks=(64, 128, 256, 512), model="gelu-1l", layer=0,
        text="hf:NeelNanda/c4-code-tokenized-2b:tokens", dict_size=2048, steps=20_000, batch_size=192, n_ctxs=2500,
        ctx_len=128, autocast_dtype="bfloat16", device="cuda", **PROTOCOL,
    ),
    seeds=(0, 1, 2),
    eval_profile="full",
    analysis_contexts=1000,
    feature_pages=8,
    paper_reference="vsae_topk:paper",
    paper_table=PAPER_TABLE,
))

register_study(Study(
    name="offline",
    description="The paper's study scaled to the embedded default model (d_model 256, dict 1024 = 4x, "
                "k/dict from 1/32 to 1/4 as in the paper): TopK vs VSAETopK with the paper's settings "
                "(noise really sampled), on the local stdlib corpus.",
    run=RunConfig(architectures=("top_k", "vsae_topk:paper"), ks=(32, 64, 128, 256), dict_size=1024, steps=1500,
                  batch_size=192, n_ctxs=500, **PROTOCOL),
    seeds=(0, 1, 2),
    evals=("core", "scr", "tpp", "sparse_probing", "absorption"),
    analysis_contexts=160,
    paper_reference="vsae_topk:paper",
    paper_table=PAPER_TABLE,
    paper_k_equivalent={32: 64, 64: 128, 128: 256, 256: 512},
))

# `make demo`: the offline study cut to fit 15 minutes on 2 cores (k 64 and 256 left out; all 3 seeds kept).
register_study(STUDIES["offline"].replace(
    name="demo",
    description="The offline study cut to fit a first run (k 32 and 128 of its 32-256; all three seeds): TopK vs "
                "VSAETopK with the paper's settings (noise really sampled) on the embedded default model.",
    ks=(32, 128),
    paper_k_equivalent={32: 64, 128: 256},
))

register_study(Study(
    name="smoke",
    description="A minute-long end-to-end check of the sweep: two architectures, two k, few steps.",
    run=RunConfig(architectures=("top_k", "vsae_topk"), ks=(8, 16), dict_size=128, steps=60, batch_size=64,
                  n_ctxs=40, ctx_len=64, **PROTOCOL),
    seeds=(0, 1),
    evals=("core", "sparse_probing"),
    analysis_contexts=24,
    unique_window=1000,
    n_clusters=4,
    feature_pages=2,
    page_examples=3,
))

register_study(Study(
    name="digits",
    description="Only the controlled MP-SAE study on sklearn's 8x8 digits (standard, TopK, VSAETopK, MP-SAE "
                "at matched L0); no language model.",
    run=RunConfig(architectures=(), ks=(10,), dict_size=1024),
    evals=(),
    digits=True,
    baseline=None,
))

# TopK, the paper's VSAETopK, each remedy alone on top of it, and the recommended default.
ABLATION_VARIANTS = ("paper+no_sampling", "paper+auxk", "paper+kl_selected", "paper+free_bits", "paper+learned_var",
                     "paper+select_mean", "paper+kl_per_dim", "paper+resample")
register_study(Study(
    name="ablation",
    description="Which change keeps VSAETopK's latents alive without losing reconstruction, under one protocol: "
                "TopK, the authors' published VSAETopK (replica), the paper's text (noise sampled), each remedy alone "
                "on top of it, and the VSAETopK default at three KL weights, at k/dict 1/32 and 1/8 (the paper's "
                "64 and 256 of 2048) on the embedded default model. Run it on gelu-1l with --setup paper.",
    run=RunConfig(architectures=("top_k", "vsae_topk:authors", "vsae_topk:paper",
                                 *(f"vsae_topk:{v}" for v in ABLATION_VARIANTS),
                                 "vsae_topk", "vsae_topk:beta_0.1", "vsae_topk:beta_0.01"),
                  ks=(32, 128), dict_size=1024, steps=1500, **PROTOCOL),
    seeds=(0, 1, 2),
    evals=("core", "scr", "tpp", "sparse_probing"),
    analysis_contexts=160,
    feature_pages=0,
    paper_reference="vsae_topk:authors",
    paper_table=PAPER_TABLE,
    paper_k_equivalent={32: 64, 128: 256},
))

# MP-SAE next to TopK and VSAETopK on the default LM, plus the controlled digits study.
register_study(Study(
    name="mp",
    description="Matching-pursuit SAE on the embedded default model beside TopK and the recommended VSAETopK "
                "(k/dict 1/64 to 1/16; MP-SAE's encoder costs k dense passes, so k stays small on a CPU), "
                "with the controlled digits study as a section.",
    run=RunConfig(architectures=("top_k", "vsae_topk", "mp_sae"), ks=(16, 32, 64), dict_size=1024, steps=1500,
                  **{**PROTOCOL, "auxk_alpha": 0.0}),  # MP-SAE has no auxK: off for every SAE
    seeds=(0, 1, 2),
    evals=("core", "scr", "tpp", "sparse_probing"),
    analysis_contexts=160,
    feature_pages=2,
    digits=True,
))

# Ground truth: every architecture on synthetic data with known features, with the digits study beside it.
register_study(Study(
    name="synth",
    description="Ground truth: standard, TopK, BatchTopK, VSAETopK (default, paper, authors), VSAE and MP-SAE "
                "trained on SynthSAEBench-style synthetic activations (SAELens's sae_lens.synthetic) at matched L0 "
                "and scored against the true features by SAELens's eval_sae_on_synthetic_data; with the "
                "controlled MP-SAE digits study beside it. No language model.",
    run=RunConfig(architectures=(), ks=(10,), dict_size=1024),
    seeds=(0, 1, 2),
    evals=(),
    digits=True,
    synth="synth",
    baseline=None,
))
