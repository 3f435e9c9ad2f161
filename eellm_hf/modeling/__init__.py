"""Hugging Face modeling of early-exit LLMs: config, model with exit heads, conversion."""

from .configuration_early_exit_gpt import EarlyExitGPTConfig
from .early_exit_settings import EarlyExitStats
from .generation_early_exit import GenerateEarlyExitDecoderOnlyOutput
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
