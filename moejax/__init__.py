"""moejax: a JAX/XLA inference framework for Mixture-of-Experts language models."""

from moejax.config import ModelConfig, get_preset
from moejax.engine.sampling import SamplingParams
from moejax.llm import LLM, RequestOutput

__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "get_preset"]
__version__ = "0.1.0"
