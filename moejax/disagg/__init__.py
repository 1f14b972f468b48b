"""Attention-expert disaggregation (Janus, arXiv 2512.13525): attention instances and MoE instances
on separate devices.

    activation_scheduler  per layer and step, which replica of each activated expert runs it
                          (fewest distinct experts on the busiest MoE instance), and replica placement
    planner               the SLO-aware planner: attention / MoE instance counts and expert replication
                          meeting a TPOT target with the fewest GPUs (priced by moejax.sim.disagg)
"""
