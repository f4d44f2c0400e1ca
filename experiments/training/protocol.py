"""The training protocol every SAE of a study shares (the LM studies and the synthetic one)."""

# One training protocol for every SAE of a study: the paper's lr (8e-4), a 5% linear warm-up, linear decay
# from 80% of the steps (the authors' code's), auxK as in Gao et al. 2024 (alpha 1/32) on latents silent for
# 20,000 tokens (a window these runs reach; dictionary_learning's 10M is never reached), activations
# normalised to unit mean squared norm (dictionary_learning's; the authors' runs did too).
PROTOCOL = dict(lr=8e-4, warmup_frac=0.05, decay_frac=0.8, auxk_alpha=1 / 32, dead_window_tokens=20_000,
                normalize_activations=True)
