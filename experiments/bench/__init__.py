"""The training-throughput benchmark behind ``python -m experiments.bench_train``, in parts:

* ``workloads``   -- the activations it trains on: the embedded model's (collected once, cached) and a d 512
                     sparse-feature mixture (no model of that width is embedded).
* ``contenders``  -- one interface over our trainers and the peers' (dictionary_learning's TopKTrainer,
                     SAELens's TopK and MatchingPursuit training SAEs with their trainer's step).
* ``race``        -- warm-up, then round-robin timing (median of rounds), dead latents and auxK's share.
* ``throughput``  -- the TopK table (VSAETopK against both peers) and its targets.
* ``mp``          -- MP-SAE: the Gram fast path against the unrolled loop and SAELens's MatchingPursuit.
* ``scaling``     -- tokens/s against dict size and k, with the dense-FLOP roofline (table and figure).
* ``memory``, ``buffer`` -- peak memory per trainer (fresh processes) and the activation buffer's speed.
"""
