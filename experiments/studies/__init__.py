"""Studies: their definitions as data (``definitions``), the sweep that runs one (``sweep``), the typed
results it writes (``results``) and the HTML report (``report``). The command lines are
``experiments.sweep`` and ``experiments.report``."""
