"""Prefill/decode disaggregation and Prefill-as-a-Service (PrfaaS, arXiv 2604.15039).

    throughput_model   Λ = min(Θ_prfaas/p, Θ_pd-p/(1−p), Θ_pd-d): the offload threshold t and the local
                       prefill:decode split (`choose_threshold`, `choose_split`)

The simulated deployment (a PrfaaS cluster, a local PD cluster, one link) is moejax.sim.pd.
"""
