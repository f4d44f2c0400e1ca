"""SAEBench adapters: wrappers, loaders, export and the eval runner.

* ``wrappers``: ``DictionarySAE`` (one SAEBench ``BaseSAE`` for every registered architecture),
  ``wrap_dictionary``, ``load_sae(trainer_dir)``, ``trainer_dirs(run_dir)``, ``sae_name(run_dir, trainer_dir)``.
* ``loaders``: ``register_with_saebench()`` (our trainer classes in SAEBench's ``TRAINER_LOADERS``, the
  registered models in ``MODEL_CONFIGS``) and the generic loader behind them.
* ``export`` / ``saelens``: ``python -m saebench_adapters.export RUN_DIR --out OUT`` / ``export_run``;
  the numerically checked SAELens copy of a dictionary.
* ``run_evals``: ``python -m saebench_adapters.run_evals --sae-dir RUN_DIR ...`` / ``run_evals(...)``, built
  from ``profiles`` (eval profiles "quick"/"full"), ``models`` (models loadable by name, registered by
  plugins), ``evals`` (the five SAEBench evals), ``patches`` (what is changed while they run) and
  ``results`` (SAEBench's result files and the summary).
* ``standin_data`` / ``standin_model``: offline stand-ins for SAEBench's datasets and for a model.

The library never imports an application: models come in through the ``saebench_adapters.models``
entry points. Submodules are imported on demand (importing SAEBench takes seconds).
"""
