"""Expert offload (LayerScope, arXiv 2509.23638): every routed expert in host memory, a device cache
of N expert slots per MoE layer, a predictor of the next layers' experts and a cross-layer load
scheduler -- for real (executor "offload") and on a cost model (executor "sim-offload").

    config.py      OffloadConfig: cache size, predictor, load rule (errors name the setting)
    memory.py      host memory kinds, the host experts, the device cache, the copies
    residency.py   which expert each slot holds, layer passes, hit / prefetch statistics (both executors)
    schedule.py    the load scheduler: on demand / host / prefetch, PreSched or layer-by-layer greedy
    predictors.py  none, lfru, gate-ahead, learned
    learned.py     LayerScope's learned predictor: features, PCA, networks, training (optax), orbax
    executor.py    OffloadExecutor (a JaxExecutor whose run_layers runs each layer in its steps)
    sim.py         SimOffloadExecutor: the same residency and scheduler, priced on the host link
"""
