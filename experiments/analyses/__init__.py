"""Analyses of trained dictionaries: functions that take a dictionary (as a SAEBench ``BaseSAE``)
and activations, and return numbers and figures. ``experiments.sweep`` runs them per SAE."""
