"""The training-run configuration: every option of a run of ``experiments.train``, once.

The train CLI's options are generated from this dataclass (``experiments.cli``), a study embeds one
(``experiments.studies.definitions``), ``run.json`` stores it, and ``--resume`` compares it field by
field. A new training option is one field here (plus where it is used).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from dictionary_learning_ext.config import ConfigError, check_field_types, dataclass_from_dict

AutocastDtype = Literal["float32", "bfloat16"]
# Trainer fields the run fills from its own options; a --set would silently contradict them.
SET_BY_OPTIONS = {
    "activation_dim": "the model's width at --layer", "lm_name": "--model", "layer": "--layer",
    "steps": "--steps", "device": "--device", "seed": "--seed", "dict_size": "--dict-size", "k": "--k",
}


def resume_mutable(**metadata: Any) -> dict[str, Any]:
    """Metadata of a field a resumed run may change (it does not affect the trained weights)."""
    return {**metadata, "resume_mutable": True}


@dataclass(frozen=True)
class RunConfig:
    """Train SAEs of any registered architecture on one shared activation buffer of a language model,
    with dictionary_learning's buffer and trainers."""

    architectures: tuple[str, ...] = field(default=(), metadata={"metavar": "NAME[:VARIANT]"})
    """Registered architectures, each optionally with a variant (vsae_topk:paper; variants compose with '+',
    e.g. vsae_topk:paper+auxk); those with a k are trained at every --k."""
    save_dir: Optional[str] = None
    """Output folder: dictionary_learning's layout save_dir/trainer_i/{ae.pt, config.json}."""
    model: str = "default"
    """'default' (the embedded offline model), 'gelu-1l', or a Hugging Face model id."""
    layer: int = 0
    """The SAEs read the residual stream after this block."""
    dict_size: Optional[int] = None
    """Latents per SAE (default: 4 x d_model)."""
    ks: tuple[int, ...] = field(default=(32,), metadata={"flag": "--k", "aliases": ("--ks",), "metavar": "K"})
    """k of the architectures that have one (each k is its own SAE)."""
    steps: int = 2000
    """Training steps."""
    # --- the training protocol: each option applies to every trainer, so architectures compare under one
    # protocol (None: each architecture's own default; a variant may keep its own value, and says so).
    lr: Optional[float] = None
    """One learning rate for every trainer (default: each architecture's own)."""
    warmup_frac: Optional[float] = None
    """Learning-rate warm-up over this fraction of the steps, for every trainer (default: each architecture's own)."""
    decay_frac: Optional[float] = None
    """The learning rate decays linearly to 0 from this fraction of the steps on, for every trainer (default:
    each architecture's own)."""
    auxk_alpha: Optional[float] = None
    """Weight of the auxK loss on dead latents, for every trainer; 0 turns it off everywhere (default: each
    architecture's own). An architecture without auxK cannot honour a value above 0."""
    dead_window_tokens: Optional[int] = None
    """A latent silent for this many tokens counts as dead (auxK's target set), for every trainer (default:
    each architecture's own; dictionary_learning's is 10M tokens)."""
    batch_size: int = 192
    """Activations per training step."""
    n_ctxs: int = 500
    """Contexts held in the activation buffer."""
    ctx_len: int = 128
    """Tokens per context."""
    refresh_batch_size: int = 64
    """Contexts per language-model forward pass when the buffer refills."""
    text: str = "local"
    """Text source: 'local' (the standard library corpus) or 'hf:<dataset>[:<column>]'."""
    activations: Optional[str] = field(default=None, metadata={"metavar": "DIR"})
    """Train on an activation cache written by experiments.cache_activations instead of a live buffer (one
    language-model pass for any number of runs); --model and --layer name what it was read from and must match
    it, and the live buffer's options (--text, --n-ctxs, --refresh-batch-size) do not apply."""
    cache_window_shards: Optional[int] = field(default=None, metadata={"metavar": "N"})
    """With --activations: shards whose activations are shuffled together (and mapped at once); default 4."""
    seed: int = 0
    """Seeds the SAEs' initial weights and noise, and the data order."""
    device: str = "cpu"
    """Torch device for the language model and the SAEs."""
    autocast_dtype: AutocastDtype = "float32"
    """Activation dtype and autocast (bfloat16: losses still in float32)."""
    normalize_activations: bool = False
    """dictionary_learning's unit mean-square scaling of activations (folded back into the saved weights)."""
    overrides: tuple[str, ...] = field(default=(), metadata={"flag": "--set", "append": True,
                                                               "metavar": "[ARCH.]KEY=VALUE"})
    """Trainer config override (JSON value), e.g. --set vsae_topk.beta=0.5 --set auxk_alpha=0."""
    eval_batches: int = field(default=4, metadata=resume_mutable())
    """Batches for the final metrics table."""
    checkpoint_every: Optional[int] = field(default=None, metadata=resume_mutable(metavar="N"))
    """Write a resumable checkpoint every N steps (kept if the run fails or is killed)."""
    skip_nonfinite_batches: bool = False
    """Skip (and count in run.json) activation batches with NaN/Inf instead of stopping."""
    wandb: bool = field(default=False, metadata=resume_mutable())
    """Log to Weights & Biases (needs network)."""
    wandb_project: str = field(default="vsae", metadata=resume_mutable())
    """Weights & Biases project."""
    collective_timeout: Optional[float] = field(default=None, metadata=resume_mutable(metavar="SECONDS"))
    """Under torchrun (data-parallel training): seconds a rank waits for the others in a collective before the run
    stops with an error naming the cause (a rank that died or hangs); default 600."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Everything checkable before touching the model or the disk (the save dir is checked by the run)."""
        for name in ("steps", "batch_size", "n_ctxs", "ctx_len", "eval_batches", "refresh_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"--checkpoint-every must be a positive number of steps, got {self.checkpoint_every}")
        if self.dict_size is not None and self.dict_size <= 0:
            raise ConfigError(f"--dict-size must be a positive integer, got {self.dict_size}")
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"--k (ks) values must be positive, got {list(self.ks)}")
        if self.dict_size is not None and max(self.ks) > self.dict_size:
            raise ConfigError(f"--k {max(self.ks)} is larger than --dict-size {self.dict_size}; choose k (ks) <= dict size")
        if self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.lr is not None and not 0 < self.lr < float("inf"):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")
        for name in ("warmup_frac", "decay_frac"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"{flag(name)} must be a fraction in [0, 1), got {value}")
        if self.warmup_frac is not None and self.decay_frac is not None and self.decay_frac <= self.warmup_frac:
            raise ConfigError(f"--decay-frac {self.decay_frac} must be above --warmup-frac {self.warmup_frac}")
        warmup = round(self.warmup_frac * self.steps) if self.warmup_frac is not None else 0
        decay = round(self.decay_frac * self.steps) if self.decay_frac is not None else None
        if decay is not None and not warmup < decay < self.steps:
            raise ConfigError(f"--decay-frac {self.decay_frac} starts the decay at step {decay} of {self.steps}, which "
                              f"must lie after the warm-up ({warmup} steps) and before the end: give more --steps")
        if self.auxk_alpha is not None and not 0 <= self.auxk_alpha < float("inf"):
            raise ConfigError(f"--auxk-alpha must be a finite number >= 0, got {self.auxk_alpha}")
        if self.dead_window_tokens is not None and self.dead_window_tokens <= 0:
            raise ConfigError(f"--dead-window-tokens must be a positive number of tokens, got {self.dead_window_tokens}")
        if self.activations is not None and not self.activations.strip():
            raise ConfigError("--activations must name a cache folder (written by python -m experiments.cache_activations)")
        if self.cache_window_shards is not None and self.cache_window_shards <= 0:
            raise ConfigError(f"--cache-window-shards must be a positive number of shards, got {self.cache_window_shards}")
        if self.collective_timeout is not None and not 0 < self.collective_timeout < float("inf"):
            raise ConfigError(f"--collective-timeout must be a positive finite number of seconds, got {self.collective_timeout}")
        if self.n_ctxs * self.ctx_len < 2 * self.batch_size:
            raise ConfigError("--n-ctxs x --ctx-len must hold at least two batches of activations")
        from dictionary_learning_ext.registry import parse_spec
        from experiments.lm.corpus import parse_text_spec
        from experiments.training.plan import check_overrides_apply, check_protocol_honoured

        for spec in self.architectures:
            parse_spec(spec)
        check_overrides_apply(self)
        check_protocol_honoured(self)
        parse_text_spec(self.text)

    # --- as stored in run.json / study.json ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        return dataclass_from_dict(cls, {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes: Any) -> "RunConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown run option(s) {unknown}; options: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def protocol(config: RunConfig) -> dict[str, Any]:
    """The protocol options the run sets (the ones that are not None)."""
    return {name: getattr(config, name) for name in PROTOCOL_FIELDS if getattr(config, name) is not None}


def flag(name: str) -> str:
    """The command-line option of a RunConfig field (e.g. ks -> --k)."""
    from experiments.cli import option_names

    return option_names(FIELDS[name])[0]


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
RESUME_MUTABLE = frozenset(name for name, f in FIELDS.items() if f.metadata.get("resume_mutable"))
PROTOCOL_FIELDS = ("lr", "warmup_frac", "decay_frac", "auxk_alpha", "dead_window_tokens")
