"""Attention-expert disaggregation (Janus, arXiv 2512.13525): attention instances and MoE instances
on separate devices.

    executor              DisaggExecutor (`build(..., "disagg")`): the model served on an attention/experts
                          split layout, rows crossing per MoE layer, micro-batch ping-pong
    exchange              the activation exchange between the pools (direct or two-phase), its bytes and messages
    microbatch            how many micro-batches (from the cost model) and which rows each takes
    timeline              the pools' busy time, from each dispatched piece's ready time
    activation_scheduler  per layer and step, which replica of each activated expert runs it
                          (fewest distinct experts on the busiest MoE instance), and replica placement
    replicas              the experts each MoE instance holds (slot buffers on the expert pool) and the
                          executor's per-step scheduling of them, jitted on the expert pool
    planner               the SLO-aware planner: attention / MoE instance counts and expert replication
                          meeting a TPOT target with the fewest GPUs (priced by moejax.sim.disagg)
"""
