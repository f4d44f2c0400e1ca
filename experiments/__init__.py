"""Experiments: training CLI, default model, presets, analyses and reports."""
