"""SAEBench adapters: wrappers, loaders, export and the eval runner.

* ``wrappers``: ``DictionarySAE`` (one SAEBench ``BaseSAE`` for every registered architecture),
  ``wrap_dictionary``, ``load_sae(trainer_dir)``, ``trainer_dirs(run_dir)``.
* ``loaders``: ``register_with_saebench()`` (our trainer classes in SAEBench's ``TRAINER_LOADERS``, the
  default model in ``MODEL_CONFIGS``) and the generic loader behind them.
* ``export``: ``python -m saebench_adapters.export RUN_DIR --out OUT`` / ``export_run``.
* ``run_evals``: ``python -m saebench_adapters.run_evals --sae-dir RUN_DIR ...`` / ``run_evals(...)``.
* ``standin_data`` / ``standin_model``: offline stand-ins for SAEBench's datasets and for a model.

Submodules are imported on demand (importing SAEBench takes seconds).
"""
