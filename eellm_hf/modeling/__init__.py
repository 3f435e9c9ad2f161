"""Hugging Face modeling of early-exit LLMs: config, model with exit heads, conversion."""

from .configuration_early_exit_gpt import EarlyExitGPTConfig
from .generation_early_exit import EarlyExitStats, GenerateEarlyExitDecoderOnlyOutput
from .modeling_early_exit_gpt import (
    EarlyExitCausalLMOutputWithPast,
    EarlyExitGPTForCausalLM,
    EarlyExitGPTModel,
    EarlyExitGPTPreTrainedModel,
    EarlyExitModelOutputWithPast,
)

__all__ = [
    "EarlyExitCausalLMOutputWithPast",
    "EarlyExitGPTConfig",
    "EarlyExitGPTForCausalLM",
    "EarlyExitGPTModel",
    "EarlyExitGPTPreTrainedModel",
    "EarlyExitModelOutputWithPast",
    "EarlyExitStats",
    "GenerateEarlyExitDecoderOnlyOutput",
]
