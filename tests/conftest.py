"""Shared pytest fixtures. Everything runs offline on CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HF_HOME = Path(tempfile.mkdtemp(prefix="eellm_hf_home_"))
HF_OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": str(_HF_HOME),
    "HF_DATASETS_CACHE": str(_HF_HOME / "datasets"),
}
# huggingface_hub / datasets / transformers read these at import time, so they are set when this
# conftest is imported, i.e. before any test module is collected.
os.environ.update(HF_OFFLINE_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the temporary HF_HOME."""
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def hf_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-assert the offline env and temporary HF_HOME for every test (and undo a test's own changes)."""
    for key, value in HF_OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls run faster on one thread than on two contended ones (shared CPUs): a module that asks for it
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``) runs on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer ``LlamaForCausalLM`` plus a locally trained tokenizer.

    The tokenizer is a byte-level BPE (~512 entries) trained with the ``tokenizers`` library on the
    first few thousand training verses of the KJV (held-out books excluded), saved as a
    ``PreTrainedTokenizerFast`` folder next to the model, so ``from_pretrained(dir)`` works offline.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from eellm_hf.corpus import training_verses

    out = tmp_path_factory.mktemp("tiny_llama")
    eos = "<|endoftext|>"

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((v["text"] for v in training_verses()[:3000]), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=eos,
        eos_token=eos,
        unk_token=eos,
        pad_token=eos,
        model_max_length=256,
    )
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_early_exit_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 4-layer ``EarlyExitGPTForCausalLM`` (exits after layers 1 and 3), saved with
    ``tiny_llama_dir``'s tokenizer.

    The exit heads' weights are scaled up so that their softmax is peaked on some tokens and flat on others:
    thresholds between 0 and 1 then give a mix of exit layers.
    """
    import torch
    from transformers import AutoTokenizer

    from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM

    out = tmp_path_factory.mktemp("tiny_early_exit")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = EarlyExitGPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        exit_layers=[1, 3],
        exit_loss_weights=[0.5, 0.5],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = EarlyExitGPTForCausalLM(config).eval()
    with torch.no_grad():
        for head in model.exit_lm_heads:
            head.weight.mul_(40.0)
    model.save_pretrained(out)
    return out
