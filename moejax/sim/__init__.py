"""The simulator's parts: the engine with a SimExecutor is the simulator.

    hardware    accelerator, link and machine specs (`get_hardware("h100x2")`)
    cost_model  roofline + power-capped cost and energy of a plan; calibration (calibration.json)
    routing     routing models drawing activated experts when no router runs
    workloads   seeded request streams (sharegpt, sharegpt4, arxiv, longctx)
    executor    SimExecutor: the Executor protocol over the cost model
    pd_models   the PrfaaS table's hybrid and dense models as priceable layer parts
    pd          a PrfaaS / PD deployment: prefill and decode priced, a request stream simulated
"""

from moejax.sim.cost_model import Calibration, CostModel, fit_calibration, load_calibration, save_calibration
from moejax.sim.executor import SimExecutor
from moejax.sim.hardware import HARDWARE, Hardware, get_hardware
from moejax.sim.routing import ROUTING_MODELS, RoutingModel, Rows, activation_curve, make_routing
from moejax.sim.workloads import WORKLOADS, WorkloadRequest, make_workload, prompt_token_ids

__all__ = [
    "HARDWARE", "ROUTING_MODELS", "WORKLOADS", "Calibration", "CostModel", "Hardware", "RoutingModel",
    "Rows", "SimExecutor", "WorkloadRequest", "activation_curve", "fit_calibration", "get_hardware",
    "load_calibration", "make_routing", "make_workload", "prompt_token_ids", "save_calibration",
]
