"""Training runs: the run configuration (``config``), what a run trains (``plan``), the activation
stream (``data``), the resumable loop (``loop``), the run folder and resume (``run_folder``), the
final metrics (``evaluate``) and the run itself (``run``). The command line is ``experiments.train``."""
