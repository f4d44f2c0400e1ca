"""The results of a study, typed: what the sweep writes to ``RUN_DIR/results.json`` and the report reads.

One ``SaeResult`` per trained SAE (its training metrics, SAEBench outcomes and analyses), and the study
around them (its definition, the model, SAEBench's run settings, the digits study, wall times).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from dictionary_learning_ext.io import read_json, write_json

from experiments.studies.definitions import Study

RESULTS_FILE = "results.json"
EvalStatus = Literal["ok", "not_evaluable", "failed"]


@dataclass
class EvalOutcome:
    """One SAEBench eval on one SAE."""

    status: EvalStatus
    metrics: dict[str, float] = field(default_factory=dict)
    """Headline metrics (status "ok")."""
    reason: Optional[str] = None
    """Why it is not evaluable or failed."""
    file: Optional[str] = None
    """SAEBench's result file (or the not-evaluable record)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalOutcome":
        return cls(status=values["status"], metrics=dict(values.get("metrics") or {}), reason=values.get("reason"),
                   file=values.get("file"))


@dataclass
class Analysis:
    """The analyses of one SAE (``experiments.analyses``) on the held-out sample."""

    firing: dict[str, Any]
    """Alive/unique/L0 counts (``analyses.firing.firing_stats``)."""
    cosine: dict[str, Any]
    """Decoder cosine statistics and histogram (``analyses.cosine.cosine_stats``)."""
    latent_map: dict[str, Any]
    """KMeans clusters, or ``{"skipped": reason}``."""
    figures: list[dict[str, str]] = field(default_factory=list)
    """Files (relative to the SAE's analysis folder) and captions."""
    feature_pages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SaeResult:
    trainer: str
    """Its trainer folder in the seed's run (trainer_i)."""
    seed: int
    """The seed it was trained with."""
    path: str
    """Its trainer folder relative to RUN_DIR/saes (and to RUN_DIR/analyses)."""
    label: str
    """``name`` or ``name:variant``."""
    architecture: str
    variant: str
    k: Optional[int]
    dict_size: int
    protocol: dict[str, Any]
    """The training protocol as its saved config.json records it (lr, warm-up, decay, auxK, dead window),
    plus the run's normalisation and precision, and the protocol values its variant departs from."""
    train_metrics: dict[str, Any]
    """The train run's metrics.json row (dictionary_learning's evaluate on buffer batches)."""
    saebench: dict[str, EvalOutcome]
    """SAEBench outcome per eval."""
    analysis: Analysis

    def metric(self, eval_type: str, name: str) -> float:
        """A SAEBench headline metric; NaN when the eval did not run, was not evaluable or failed."""
        outcome = self.saebench.get(eval_type)
        if outcome is None or outcome.status != "ok" or outcome.metrics.get(name) is None:
            return math.nan
        return float(outcome.metrics[name])

    @property
    def frac_alive(self) -> float:
        """Fraction of latents that fire at least once on the analysis tokens."""
        return float(self.analysis.firing["frac_alive"])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SaeResult":
        values = dict(values)
        values["saebench"] = {e: EvalOutcome.from_dict(o) for e, o in values["saebench"].items()}
        values["analysis"] = Analysis(**values["analysis"])
        return cls(**values)


@dataclass
class StudyResults:
    study: Study
    run_dir: str
    saes: list[SaeResult]
    wall_seconds: dict[str, Optional[float]]
    """Seconds per stage (train, evals, analyses, digits) of the run that produced each stage's output."""
    model: Optional[str] = None
    hook_name: Optional[str] = None
    d_model: Optional[int] = None
    saebench: Optional[dict[str, Any]] = None
    """SAEBench's run settings: model, profile, standins, datasets_dropped, evals, seconds."""
    digits: Optional[dict[str, Any]] = None
    """The digits study's results.json (``experiments.digits``), when the study runs it."""
    synth: Optional[dict[str, Any]] = None
    """The synthetic ground-truth study's results.json (``experiments.synth``), when the study runs it."""

    # --- reading ---------------------------------------------------------------------------------
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.saes})

    def groups(self) -> dict[tuple[str, Optional[int]], list[SaeResult]]:
        """The SAEs of each (label, k), one per seed, in the run's order."""
        out: dict[tuple[str, Optional[int]], list[SaeResult]] = {}
        for r in self.saes:
            out.setdefault((r.label, r.k), []).append(r)
        return out

    # --- the file ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["study"] = self.study.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "StudyResults":
        values = dict(values)
        values["study"] = Study.from_dict(values["study"])
        values["saes"] = [SaeResult.from_dict(r) for r in values["saes"]]
        return cls(**values)

    def save(self, run_dir: Path) -> Path:
        return write_json(Path(run_dir) / RESULTS_FILE, self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> "StudyResults":
        return cls.from_dict(read_json(Path(run_dir) / RESULTS_FILE, "study results"))
