"""What an offload run is asked for: the device expert cache's size, the predictor and the load rule,
checked against the model with errors that name the setting."""

from __future__ import annotations

from dataclasses import dataclass

from moejax.config import ModelConfig

PREDICTORS = ("none", "lfru", "gate-ahead", "learned")
LOAD_RULES = ("presched", "greedy")  # cross-layer (LayerScope's PreSched) or layer-by-layer greedy


@dataclass(frozen=True)
class OffloadConfig:
    slots: int  # N: device expert slots per MoE layer (every routed expert also lives in host memory)
    predictor: str = "none"
    load_rule: str = "presched"
    host_compute: bool = False  # compute a non-resident expert on the host when the cost model says so
    lookahead: int = 2  # layers ahead the loads are chosen for (l+1, ..., l+lookahead)


def offload_config(cfg: ModelConfig, *, offload_experts: float | None = None, device_expert_slots: int | None = None,
                   predictor: str = "none", load_rule: str = "presched", host_compute: bool = False,
                   lookahead: int = 2) -> OffloadConfig:
    """An OffloadConfig for `cfg`: the cache holds `device_expert_slots` experts per MoE layer, or all
    but the fraction `offload_experts` of them (kept only in host memory); default half of them."""
    if cfg.num_experts == 0:
        raise ValueError(f"expert offload needs an MoE model: {cfg.name} is dense (no routed experts to offload)")
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    if offload_experts is not None and device_expert_slots is not None:
        raise ValueError(f"give offload_experts ({offload_experts}) or device_expert_slots ({device_expert_slots}), "
                         "not both: each sets the device expert cache's size")
    if device_expert_slots is None:
        fraction = 0.5 if offload_experts is None else offload_experts
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"offload_experts={fraction}: the fraction of routed experts kept only in host memory "
                             "must be in [0, 1)")
        device_expert_slots = round(E * (1.0 - fraction))
        origin = f"offload_experts={fraction} leaves {device_expert_slots} of {E} experts per layer on the device"
    else:
        origin = f"device_expert_slots={device_expert_slots}"
    if device_expert_slots < K:
        raise ValueError(f"{origin}: fewer slots than the {K} experts one token of {cfg.name} needs (top-k); "
                         f"give at least {K}")
    if device_expert_slots > E:
        raise ValueError(f"{origin}: more slots than {cfg.name}'s {E} experts per layer")
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; predictors: {', '.join(PREDICTORS)}")
    if load_rule not in LOAD_RULES:
        raise ValueError(f"unknown load_rule {load_rule!r}; rules: {', '.join(LOAD_RULES)}")
    if lookahead < 1:
        raise ValueError(f"lookahead={lookahead}: loads are chosen for at least the next layer (>= 1)")
    return OffloadConfig(device_expert_slots, predictor, load_rule, host_compute, lookahead)
