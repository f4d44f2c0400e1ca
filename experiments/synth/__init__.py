"""Ground truth: every architecture scored on SynthSAEBench-style synthetic data with known features
(Chanin & Garriga-Alonso 2026, SAELens's ``sae_lens.synthetic``).

``model`` holds the synthetic-model settings (typed, validated) and builds or loads the SAELens model,
``setups`` the named setups (``synth``, ``synthsaebench16k``), ``study`` trains and writes ``results.json``,
``metrics`` is the adapter to SAELens's ``eval_sae_on_synthetic_data`` and the per-feature analyses,
``claims`` reads the results against the claims, ``figures`` draws them; ``python -m experiments.synth_study``
is the command line.
"""
