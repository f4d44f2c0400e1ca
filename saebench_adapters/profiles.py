"""Eval profiles: how much work each SAEBench eval does in one run.

A profile holds, per eval, settings handed to that eval's own config; a setting a profile leaves out
keeps SAEBench's default. (Called *profiles*, not presets: "preset" means other things elsewhere in
the project.) This module imports nothing heavy: the command line reads it before parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

EVALS = ("core", "absorption", "scr", "tpp", "sparse_probing")
"""The SAEBench evals the runner knows, in the order it runs them."""


@dataclass(frozen=True)
class EvalProfile:
    """Settings per eval for one run of the evals."""

    core: Mapping[str, Any]
    """Keyword arguments of SAEBench's ``core.main.multiple_evals`` (batch counts and sizes)."""
    absorption: Mapping[str, Any]
    """Fields of ``AbsorptionEvalConfig``."""
    scr_tpp: Mapping[str, Any]
    """Fields of ``ScrAndTppEvalConfig``, shared by SCR and TPP."""
    sparse_probing: Mapping[str, Any]
    """Fields of ``SparseProbingEvalConfig``."""
    llm_batch_size: int = 32
    """Texts per language-model forward pass, in every eval (absorption's own setting wins)."""
    context_length: int = 128
    """Tokens per probe/absorption text and per core context (capped by the model's n_ctx)."""


# "quick" follows SAEBench's own test settings (core 4 prompts x 5 / 20 batches, SCR n_values=[10],
# absorption min_GT_probe_f1=0.3) with small probe sets, so all five evals take minutes on a CPU.
# probe_lr 1e-2: with SAEBench's 1e-3 the SCR/TPP probes stay at chance on tiny models in 20 epochs.
QUICK = EvalProfile(
    core=dict(n_eval_reconstruction_batches=5, n_eval_sparsity_variance_batches=20, eval_batch_size_prompts=4),
    absorption=dict(min_GT_probe_f1=0.3, max_k_value=3, k_sparse_probe_num_epochs=10,
                    precalc_k_sparse_probe_sae_acts=True, llm_batch_size=32),
    scr_tpp=dict(train_set_size=200, test_set_size=100, n_values=[2, 10], probe_epochs=20, probe_lr=1e-2,
                 sae_batch_size=125),
    sparse_probing=dict(probe_train_set_size=200, probe_test_set_size=100),
    llm_batch_size=32,
    context_length=64,
)
# "full": SAEBench's defaults (core: the numbers of its run_all_evals_dictionary_learning_saes).
FULL = EvalProfile(
    core=dict(n_eval_reconstruction_batches=200, n_eval_sparsity_variance_batches=2000, eval_batch_size_prompts=16),
    absorption={},
    scr_tpp={},
    sparse_probing={},
    llm_batch_size=32,
)
PROFILES: dict[str, EvalProfile] = {"quick": QUICK, "full": FULL}
DEFAULT_PROFILE = "quick"
