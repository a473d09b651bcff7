"""Fused kernels of fspo-engine. Imports nothing from `fspo_engine.engine`.

Each op picks its Triton path on CUDA and a plain-torch path elsewhere.
"""

from fspo_engine.kernels.attention import prefix_shared_attention
from fspo_engine.kernels.logprobs import linear_logprob_sums

__all__ = ["linear_logprob_sums", "prefix_shared_attention"]
