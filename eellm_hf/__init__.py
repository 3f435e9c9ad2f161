"""eellm_hf: early-exit large language models for the Hugging Face ecosystem.

Importing the package registers `EarlyExitGPTConfig` and `EarlyExitGPTForCausalLM` with transformers'
`AutoConfig` / `AutoModel` / `AutoModelForCausalLM`, and marks them so that `save_pretrained` ships their code
(`from_pretrained(dir, trust_remote_code=True)` then works where `eellm_hf` is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    EarlyExitCausalLMOutputWithPast,
    EarlyExitGPTConfig,
    EarlyExitGPTForCausalLM,
    EarlyExitGPTModel,
    EarlyExitModelOutputWithPast,
    EarlyExitStats,
    GenerateEarlyExitDecoderOnlyOutput,
)

AutoConfig.register(EarlyExitGPTConfig.model_type, EarlyExitGPTConfig, exist_ok=True)
AutoModel.register(EarlyExitGPTConfig, EarlyExitGPTModel, exist_ok=True)
AutoModelForCausalLM.register(EarlyExitGPTConfig, EarlyExitGPTForCausalLM, exist_ok=True)
EarlyExitGPTConfig.register_for_auto_class()
EarlyExitGPTModel.register_for_auto_class("AutoModel")
EarlyExitGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "EarlyExitCausalLMOutputWithPast",
    "EarlyExitGPTConfig",
    "EarlyExitGPTForCausalLM",
    "EarlyExitGPTModel",
    "EarlyExitModelOutputWithPast",
    "EarlyExitStats",
    "GenerateEarlyExitDecoderOnlyOutput",
]
