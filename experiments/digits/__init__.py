"""Controlled digits study: MP-SAE against shallow SAEs at matched L0 (Costa et al. 2025, on MNIST).

``study`` trains and writes ``results.json``, ``metrics`` measures the dictionaries, ``figures`` draws
them; ``python -m experiments.digits_study`` is the command line.
"""
