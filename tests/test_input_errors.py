"""Bad input gets a clear error naming the value: CLIs (convert, generate, eval), configs (model, trainer), data
files, model folders and their index files, the data cache key."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eellm_hf import EarlyExitGPTConfig

SMALL = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4)


# ------------------------------------------------------------------------------------------------------------
# EarlyExitGPTConfig
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    (dict(exit_layers=[1.9]), r"`exit_layers` entries must be integers, got 1\.9"),
    (dict(exit_layers="12"), r"`exit_layers` must be a list, got str '12'"),
    (dict(exit_layers=[True]), r"`exit_layers` entries must be integers, got True"),
    (dict(exit_layers=[1], exit_mlp="false"), r"`exit_mlp` must be true or false, got str 'false'"),
    (dict(exit_layers=[1], exit_norm=1), r"`exit_norm` must be true or false, got int 1"),
    (dict(exit_layers=[1], exit_gate_before_mlp="yes"), r"`exit_gate_before_mlp` must be true or false, got str"),
    (dict(exit_layers=[1], exit_loss_weights=["0.5"]), r"entries must be numbers, got '0\.5'"),
    (dict(exit_layers=[1], exit_loss_weights="0.5"), r"`exit_loss_weights` must be a list, got str '0.5'"),
    (dict(exit_layers=[1], exit_vocab=[1.5]), r"`exit_vocab` entries must be token ids in \[0, \d+\].*got 1\.5"),
])
def test_config_refuses_values_of_the_wrong_type(fields, message):
    with pytest.raises(TypeError, match=message):
        EarlyExitGPTConfig(**SMALL, **fields)


def test_config_refuses_infinite_exit_loss_weights():
    with pytest.raises(ValueError, match=r"`exit_loss_weights` entries must be finite, got inf in \[inf\]"):
        EarlyExitGPTConfig(**SMALL, exit_layers=[1], exit_loss_weights=[math.inf])


@pytest.mark.parametrize("fields", [dict(exit_mlp=True), dict(exit_gate=True)])
def test_a_gate_before_the_mlp_needs_a_gate_and_an_mlp(fields):
    with pytest.raises(ValueError, match=r"`exit_gate_before_mlp` needs `exit_gate` and `exit_mlp`, got exit_gate="):
        EarlyExitGPTConfig(**SMALL, exit_layers=[1], exit_gate_before_mlp=True, **fields)


def test_config_still_accepts_tuples_and_round_trips():
    config = EarlyExitGPTConfig(**SMALL, exit_layers=(1, 2), exit_loss_weights=(1, 0.5))
    again = EarlyExitGPTConfig.from_dict(config.to_dict())
    assert again.exit_layers == [1, 2] and again.exit_loss_weights == [1.0, 0.5] and again.exit_mlp is False


# ------------------------------------------------------------------------------------------------------------
# Trainer config and data
# ------------------------------------------------------------------------------------------------------------


def _trainer_dict(tmp_path: Path, **model) -> dict:
    return {"model": {"vocab_size": 300, **SMALL, "exit_layers": [1], **model},
            "data": {"files": [str(tmp_path / "corpus.txt")], "tokenizer": str(tmp_path / "tok"), "seq_len": 8},
            "train": {"steps": 1, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3},
            "checkpoint": {"dir": str(tmp_path / "ckpt")}, "run_dir": str(tmp_path / "run")}


@pytest.mark.parametrize("field", ["pad_token_id", "bos_token_id", "eos_token_id"])
def test_trainer_refuses_token_ids_outside_the_vocabulary(tmp_path, field):
    from eellm_hf.trainer.config import load_config

    with pytest.raises(ValueError, match=rf"model\.{field}=300 is outside the vocabulary \[0, vocab_size=300\)"):
        load_config(_trainer_dict(tmp_path, **{field: 300}), check_files=False)
    with pytest.raises(ValueError, match=rf"model\.{field}=-1 is outside"):
        load_config(_trainer_dict(tmp_path, **{field: -1}), check_files=False)


def test_trainer_model_type_errors_name_the_value(tmp_path):
    from eellm_hf.trainer.config import load_config

    with pytest.raises(ValueError, match=r"invalid `model` section: `exit_mlp` must be true or false, got str"):
        load_config(_trainer_dict(tmp_path, exit_mlp="false"), check_files=False)


@pytest.mark.parametrize(("model", "parallelism", "message"), [
    (dict(exit_vocab_size=0), {}, r"`model.exit_vocab_size` must be a positive integer, got 0"),
    (dict(exit_vocab_size="8k"), {}, r"`model.exit_vocab_size` must be a positive integer, got '8k'"),
    (dict(exit_vocab_size=301), {}, r"`model.exit_vocab_size`=301 exceeds vocab_size=300"),
    (dict(exit_vocab_size=8, exit_layers=[]), {}, r"`model.exit_vocab_size`=8 but the model has no exits"),
    (dict(exit_vocab_size=8, exit_vocab=[1, 2]), {}, r"`model.exit_vocab` and `model.exit_vocab_size` are exclusive"),
    (dict(exit_vocab=[1, 2, 149]), dict(tp=2, pp=1, dp=1),
     r"`model.exit_vocab` has no token id in \[150, 300\), the vocabulary shard of TP rank 1 of tp=2"),
])
def test_trainer_refuses_a_bad_exit_shortlist(tmp_path, model, parallelism, message):
    from eellm_hf.trainer.config import load_config

    raw = _trainer_dict(tmp_path, **model)
    if parallelism:
        raw["parallelism"] = parallelism
    with pytest.raises(ValueError, match=message):
        load_config(raw, world_size=2 if parallelism else None, check_files=False)


def test_resume_accepts_true_false_auto_only(tmp_path):
    from eellm_hf.trainer.config import load_config

    raw = _trainer_dict(tmp_path)
    for value in (True, False, "auto"):
        raw["checkpoint"]["resume"] = value
        assert load_config(raw, check_files=False).checkpoint.resume == value
    raw["checkpoint"]["resume"] = "yes"
    with pytest.raises(ValueError, match=r"`checkpoint.resume` must be true, false or auto; got 'yes'"):
        load_config(raw, check_files=False)
    raw["checkpoint"]["resume"] = True
    raw["train"]["skip_nonfinite_steps"] = -1
    with pytest.raises(ValueError, match=r"`train.skip_nonfinite_steps` must be >= 0"):
        load_config(raw, check_files=False)


def test_empty_data_files_are_named(tmp_path):
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.data import load_text_dataset

    (tmp_path / "corpus.txt").write_text("")
    with pytest.raises(ValueError, match=rf"empty data files \(0 bytes\): {tmp_path / 'corpus.txt'}"):
        load_config(_trainer_dict(tmp_path))
    with pytest.raises(ValueError, match=rf"empty data files \(0 bytes\): {tmp_path / 'corpus.txt'}"):
        load_text_dataset([tmp_path / "corpus.txt"])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"cannot read data files {blank} as json"):
        load_text_dataset([blank], cache_dir=tmp_path / "cache")


def test_data_cache_key_follows_contents_not_paths(tmp_path):
    """The packed-data cache key changes when a data file is rewritten in place or the tokenizer is retrained in
    place, and not when nothing changed."""
    from eellm_hf.trainer.config import load_config
    from eellm_hf.trainer.data import train_bpe_tokenizer
    from eellm_hf.trainer.run_data import data_cache_key as _data_cache_key

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("in the beginning god created the heaven and the earth\n" * 20)
    train_bpe_tokenizer([corpus], 300, tmp_path / "tok")
    cfg = load_config(_trainer_dict(tmp_path), check_files=False)
    first = _data_cache_key(cfg, tmp_path / "tok")
    assert _data_cache_key(cfg, tmp_path / "tok") == first
    corpus.write_text("and the earth was without form and void\n" * 20)
    rewritten = _data_cache_key(cfg, tmp_path / "tok")
    assert rewritten != first
    train_bpe_tokenizer([corpus], 270, tmp_path / "tok")  # retrained in place
    assert _data_cache_key(cfg, tmp_path / "tok") not in (first, rewritten)


def test_index_json_may_not_point_outside_the_model_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    from eellm_hf.trainer.weights import read_hf_tensors

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    save_file({"w": torch.ones(2)}, str(model_dir / "inside.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors"):
        index.write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(ValueError, match="is outside the model folder"):
            read_hf_tensors(model_dir)
    index.write_text(json.dumps({"weight_map": {"w": "inside.safetensors"}}))
    assert torch.equal(read_hf_tensors(model_dir)("w"), torch.ones(2))


# ------------------------------------------------------------------------------------------------------------
# Command lines and model folders
# ------------------------------------------------------------------------------------------------------------


def test_convert_refuses_to_overwrite_its_source(tiny_llama_dir, tmp_path):
    from eellm_hf.modeling.convert import main

    src = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, src)
    before = (src / "model.safetensors").read_bytes()
    for dst in (src, src / "."):
        with pytest.raises(SystemExit, match=r"the output folder .* is the source folder"):
            main([str(src), str(dst), "--exit-layers", "1"])
    assert (src / "model.safetensors").read_bytes() == before
    assert json.loads((src / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize(("flags", "message"), [
    (["--exit-layers", "9"], r"eellm-convert: exit_layers entry 9 is outside \[1, 1\]"),
    (["--exit-layers", "1", "--exit-gate-before-mlp"], r"eellm-convert: `exit_gate_before_mlp` needs `exit_gate`"),
])
def test_convert_names_bad_exit_options_before_loading(tiny_llama_dir, tmp_path, flags, message):
    from eellm_hf.modeling.convert import main

    with pytest.raises(SystemExit, match=message):
        main([str(tiny_llama_dir), str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("size", "with_text", "message"), [
    ("2", False, r"eellm-convert: --exit-vocab-size and --exit-vocab-text go together"),
    ("0", True, r"eellm-convert: --exit-vocab-size: the exit vocabulary size must be an integer in \[1, \d+\].*got 0"),
])
def test_convert_names_a_bad_exit_vocabulary(tiny_llama_dir, tmp_path, size, with_text, message):
    from eellm_hf.modeling.convert import main

    text = tmp_path / "text.txt"
    text.write_text("some text to count tokens of")
    flags = ["--exit-layers", "1", "--exit-vocab-size", size] + (["--exit-vocab-text", str(text)] if with_text else [])
    with pytest.raises(SystemExit, match=message):
        main([str(tiny_llama_dir), str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def _generate_error(capsys, argv) -> str:
    from eellm_hf.generate_cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_generate_names_a_missing_model_folder(capsys, tmp_path):
    err = _generate_error(capsys, [str(tmp_path / "no" / "such" / "model"), "--prompt", "x", "--max-new-tokens", "2"])
    assert f"model folder {tmp_path / 'no' / 'such' / 'model'} does not exist" in err


def test_generate_refuses_empty_and_over_long_prompts(capsys, tiny_early_exit_dir):
    model = str(tiny_early_exit_dir)
    err = _generate_error(capsys, [model, "--prompt", "In the", "--prompt", "", "--max-new-tokens", "2"])
    assert "prompt 2 ('') is empty: it encodes to no tokens" in err
    long_prompt = "In the beginning God created the heaven and the earth. " * 40
    err = _generate_error(capsys, [model, "--prompt", long_prompt, "--max-new-tokens", "2"])
    assert "more than the model's max_position_embeddings=256" in err
    err = _generate_error(capsys, [model, "--prompt", "In the", "--max-new-tokens", "300"])
    assert "with --max-new-tokens 300" in err


def test_threshold_on_a_model_without_exits_is_an_error(tiny_llama_dir):
    import torch

    from eellm_hf import EarlyExitGPTForCausalLM

    model = EarlyExitGPTForCausalLM.from_pretrained(tiny_llama_dir).eval()  # a Llama folder: no exits
    assert model.config.exit_layers == []
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"`early_exit_threshold`=0\.5 needs early exits, but this model has none"):
        model.generate(prompt, max_new_tokens=2, early_exit_threshold=0.5)
    assert model.generate(prompt, max_new_tokens=2, do_sample=False).shape == (1, 5)  # full depth still works


def test_eval_names_a_missing_model_folder(tmp_path):
    from eellm_hf.eval.cli import main
    from eellm_hf.eval.lm_eval_model import EarlyExitLM

    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        EarlyExitLM(pretrained=str(missing))
    with pytest.raises(SystemExit, match=f"eellm-eval: model folder {missing} does not exist"):
        main(["--model", "eellm", "--model_args", f"pretrained={missing}", "--tasks", "kjv_cloze",
              "--include_path", str(Path(__file__).parents[1] / "eellm_hf" / "eval" / "tasks"), "--device", "cpu"])


def test_exported_tokenizer_loads_without_eellm_hf_and_without_a_prompt(tiny_early_exit_dir):
    """In a Python that never imports eellm_hf, the exported folder's tokenizer loads with no question asked:
    its tokenizer_config.json names the tokenizer class. (transformers 5 still reads the model config first, whose
    auto_map names remote code: `trust_remote_code=False` says no to it up front.)"""
    saved = json.loads((tiny_early_exit_dir / "tokenizer_config.json").read_text())
    assert saved.get("tokenizer_class")
    code = ("import sys; from transformers import AutoTokenizer; "
            f"t = AutoTokenizer.from_pretrained({str(tiny_early_exit_dir)!r}, trust_remote_code=False); "
            "assert 'eellm_hf' not in sys.modules; print('TOKENS', len(t(['In the beginning'])['input_ids'][0]))")
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert int(done.stdout.split("TOKENS")[1]) > 0
