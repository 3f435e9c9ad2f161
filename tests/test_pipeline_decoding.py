"""Pipeline-parallel early-exit decoding against single-process generation with KV recomputation.

Two models (6 layers, float64 so that decisions cannot differ by rounding): "plain" (exits after layers 1, 3 and 4,
tied embeddings) and "block" (exit blocks after layers 2 and 4, exits projecting with the final head onto a
shortlist of every other token, learned confidence gates, weights saved in shards). One 2-process and one 3-process
launch each run both models under two layouts, with greedy search, sampling, full depth, `top2_margin` with a subset
of exits, the gates (block model), and a row that stops at an end-of-sequence token, on batches of prompts of
different lengths (left padding); every output must equal the single-process `generate` token for token, exit layer
for exit layer. The layouts put exits on different stages (and a stage without exits); the reference outputs must
use exits on at least two stages. Each rank also reports the tensors it read and the parameters it materialised:
exactly its stage's. A 2-process launch runs the CLI (`eellm_hf.generate_cli --pp 2 --json`), which must print what
the single-process command prints; a 3-process launch kills a middle rank during decoding: every rank must end with
a clear error, quickly.

This file is also the worker script (`python tests/test_pipeline_decoding.py MODE SPEC OUT`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

try:
    from tests.dist_utils import REPO_ROOT, launch
except ImportError:  # tests/ is not a package here: pytest put tests/ itself on sys.path
    from dist_utils import REPO_ROOT, launch

NEW_TOKENS = 10
MODELS = {
    "plain": dict(exit_layers=[1, 3, 4], tie_word_embeddings=True),
    "block": dict(exit_layers=[2, 4], exit_block=True, exit_mlp=True, tie_exit_heads=True, exit_gate=True,
                  exit_gate_before_mlp=True),
}
LAYOUTS = {
    2: {"plain": [[3, 3], [1, 5]], "block": [[3, 3], [4, 2]]},
    3: {"plain": [[2, 2, 2], [3, 2, 1]], "block": [[1, 1, 4], [2, 2, 2]]},
}
FAULT_TIMEOUT_S = 30


# ------------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------------


def _worker_equivalence(spec_path: str, out_dir: str) -> None:
    import torch

    from eellm_hf.pipeline_decoding import PipelineEarlyExitGPT

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    results, stages = [], []
    for run in spec["runs"]:
        pipeline = PipelineEarlyExitGPT.from_pretrained(run["dir"], layer_split=run["layer_split"],
                                                        dtype=torch.float64, timeout_s=60)
        materialised = sorted(name for name, p in pipeline.model.named_parameters(remove_duplicate=False)
                              if p.device.type != "meta")
        stages.append({"loaded": pipeline.loaded_tensors, "materialised": materialised})
        with pipeline:
            if pipeline.is_first:
                outputs = []
                for call in run["calls"]:
                    torch.manual_seed(call["seed"])
                    output = pipeline.generate(input_ids=torch.tensor(call["input_ids"]),
                                               attention_mask=torch.tensor(call["attention_mask"]),
                                               return_dict_in_generate=True, **call["kwargs"])
                    outputs.append({"sequences": output.sequences.tolist(),
                                    "exit_layers": output.exit_layers.tolist()})
                results.append(outputs)
    errors = {}
    for name, kwargs in spec.get("bad", {}).items():
        try:
            PipelineEarlyExitGPT.from_pretrained(spec["runs"][0]["dir"], **kwargs)
        except ValueError as exc:
            errors[name] = str(exc)
    report = {"results": results, "stages": stages, "errors": errors}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    if spec.get("cli"):
        from eellm_hf import generate_cli

        print("CLI OUTPUT FOLLOWS", flush=True)
        generate_cli.main([*spec["cli"], "--pp", os.environ["WORLD_SIZE"]])
    if spec.get("fault"):
        _worker_fault(spec["fault"])


def _worker_fault(model_dir: str) -> None:
    """Rank 1 dies in its fourth step; everything runs as `eellm-generate --pp 3` does."""
    from eellm_hf import generate_cli
    from eellm_hf.pipeline_decoding import PipelineStage

    if os.environ["RANK"] == "1":
        original, calls = PipelineStage.run, [0]

        def run_then_die(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 4:
                os._exit(7)
            return original(self, *args, **kwargs)

        PipelineStage.run = run_then_die
    generate_cli.main([model_dir, "--pp", "3", "--prompt", "In the beginning", "--max-new-tokens", "30",
                       "--early-exit-threshold", "0.5", "--timeout-s", str(FAULT_TIMEOUT_S)])


# ------------------------------------------------------------------------------------------------------------
# Pytest side
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """The two models, with `tiny_llama_dir`'s tokenizer; exit heads scaled up so that thresholds mix exits."""
    import torch
    from transformers import AutoTokenizer

    from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    dirs = {}
    for name, overrides in MODELS.items():
        if name == "block":  # vocabulary-pruned exits: every other token of the vocabulary
            overrides = {**overrides, "exit_vocab": list(range(0, len(tokenizer), 2))}
        out = tmp_path_factory.mktemp(f"pipeline_{name}")
        tokenizer.save_pretrained(out)
        torch.manual_seed(0)
        config = EarlyExitGPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **overrides,
        )
        model = EarlyExitGPTForCausalLM(config).eval()
        with torch.no_grad():
            heads = [model.lm_head] if config.tie_exit_heads else list(model.exit_lm_heads)
            for head in heads:
                head.weight.mul_(40.0)
        model.save_pretrained(out, max_shard_size="40KB" if name == "block" else "1GB")
        dirs[name] = out
    assert (dirs["block"] / "model.safetensors.index.json").is_file()
    return dirs


def _batch(tokenizer, prompts: list[str]) -> dict[str, list]:
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"].tolist(), "attention_mask": encoded["attention_mask"].tolist()}


def _reference(model, call: dict) -> dict:
    import torch

    torch.manual_seed(call["seed"])
    output = model.generate(input_ids=torch.tensor(call["input_ids"]),
                            attention_mask=torch.tensor(call["attention_mask"]),
                            return_dict_in_generate=True, **call["kwargs"])
    sequences = output.sequences.tolist()
    layers = output.exit_layers.tolist() if getattr(output, "exit_layers", None) is not None else \
        [[model.config.num_hidden_layers] * (len(sequences[0]) - len(call["input_ids"][0]))] * len(sequences)
    return {"sequences": sequences, "exit_layers": layers}


@pytest.fixture(scope="module")
def scenarios(model_dirs) -> dict[str, dict]:
    """Per model: the generate calls and their single-process outputs."""
    import torch
    from transformers import AutoTokenizer

    from eellm_hf import EarlyExitGPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["plain"])
    mixed = _batch(tokenizer, ["In the beginning", "And God said, Let there be light: and there was", "Amen"])
    pair = _batch(tokenizer, ["The LORD is my shepherd", "Blessed are the meek: for"])
    single = _batch(tokenizer, ["In the beginning God created"])
    base = {"max_new_tokens": NEW_TOKENS, "pad_token_id": tokenizer.pad_token_id}
    out = {}
    for name, model_dir in model_dirs.items():
        model = EarlyExitGPTForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        exits = model.config.exit_layers
        calls = [
            dict(mixed, seed=0, kwargs=dict(base, early_exit_threshold=0.4, do_sample=False)),
            dict(pair, seed=5, kwargs=dict(base, early_exit_threshold=0.6, do_sample=True, top_k=20)),
            dict(single, seed=0, kwargs=dict(base, do_sample=False)),
            dict(pair, seed=0, kwargs=dict(base, early_exit_threshold=0.3, exit_confidence="top2_margin",
                                           active_exits=exits[1:], do_sample=False)),
        ]
        if model.config.exit_gate:  # learned confidence gates: the projection runs only for leaving rows
            calls.append(dict(mixed, seed=0, kwargs=dict(base, early_exit_threshold=0.5, exit_confidence="gate",
                                                         do_sample=False)))
            calls.append(dict(mixed, seed=0, kwargs=dict(base, early_exit_threshold=0.3, exit_gate_threshold=0.4,
                                                         exit_confidence="gate_max_prob", do_sample=False)))
        # A row that ends early: the end-of-sequence token is the one row 0 generates at its fourth step.
        greedy = _reference(model, calls[0])
        eos = greedy["sequences"][0][len(mixed["input_ids"][0]) + 3]
        calls.append(dict(mixed, seed=0, kwargs=dict(base, early_exit_threshold=0.4, do_sample=False,
                                                     eos_token_id=eos)))
        expected = [_reference(model, c) for c in calls]
        for call, result in zip(calls, expected):  # each call with a threshold has tokens leaving early
            if "early_exit_threshold" in call["kwargs"]:
                layers = {layer for row in result["exit_layers"] for layer in row}
                assert layers & set(exits), (name, call["kwargs"], layers)
        out[name] = {"dir": str(model_dir), "calls": calls, "expected": expected, "model": model}
    return out


def _cli_args(model_dir: Path) -> list[str]:
    return [str(model_dir), "--prompt", "In the beginning", "--prompt", "And God said, Let there be",
            "--max-new-tokens", str(NEW_TOKENS), "--early-exit-threshold", "0.4", "--dtype", "float64", "--json"]


def _launch(pp: int, scenarios: dict, model_dirs: dict, out: Path) -> tuple[list[dict], list, list[dict]]:
    """One launch: the equivalence runs, then (pp=2) the CLI or (pp=3) the fault; returns the runs, the ranks'
    results and their reports."""
    runs = [{"dir": scenarios[name]["dir"], "layer_split": split, "calls": scenarios[name]["calls"], "name": name}
            for name, splits in LAYOUTS[pp].items() for split in splits]
    spec = {"runs": runs}
    if pp == 2:
        spec["cli"] = _cli_args(model_dirs["plain"])
        spec["bad"] = {"pp": {"pp": 3}, "split": {"layer_split": [2, 2]}}
    else:
        spec["fault"] = str(model_dirs["plain"])
    (out / "spec.json").write_text(json.dumps(spec))
    results = launch(Path(__file__), pp, ["equivalence", str(out / "spec.json"), str(out)], timeout_s=240,
                     check=pp == 2)
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(pp)]
    return runs, results, reports


@pytest.fixture(scope="module")
def launches(scenarios, model_dirs, tmp_path_factory) -> dict[int, tuple]:
    return {pp: _launch(pp, scenarios, model_dirs, tmp_path_factory.mktemp(f"pp{pp}")) for pp in (2, 3)}


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_equals_single_process_generation(pp, scenarios, launches):
    from eellm_hf.trainer.parallel_model import make_layout
    from eellm_hf.trainer.weights import read_hf_tensors

    runs, _, ranks = launches[pp]
    exits_on_two_stages = set()
    for index, run in enumerate(runs):
        scenario = scenarios[run["name"]]
        got = ranks[0]["results"][index]
        assert got == scenario["expected"], f"{run['name']} split {run['layer_split']}"

        # Early exits and the final head produced tokens; note the layouts where exits on two stages did.
        config = scenario["model"].config
        layout = make_layout(config, pp, run["layer_split"])
        used = {layer for call in scenario["expected"] for row in call["exit_layers"] for layer in row if layer > 0}
        exit_stages = {layout.stage_of_layer(layer) for layer in used if layer < config.num_hidden_layers}
        assert exit_stages and config.num_hidden_layers in used, (run, used)
        if len(exit_stages) >= 2:
            exits_on_two_stages.add(run["name"])

        # Each rank read and materialised exactly its own stage's tensors.
        files = read_hf_tensors(run["dir"]).keys
        names = [name for name, _ in scenario["model"].named_parameters(remove_duplicate=False)]
        for stage in range(pp):
            report = ranks[stage]["stages"][index]
            own = {name for name in names if layout.stage_of_hf_name(name) == stage}
            if config.tie_exit_heads and any(layout.stage_of_exit(j) == stage for j in range(config.num_exits)):
                own.add("lm_head.weight")  # its exits project with the final head
            assert set(report["materialised"]) == own, (run, stage)
            # tied embeddings: the final head's weight is saved once, under the embedding's name
            expected_keys = {name if name in files else "model.embed_tokens.weight" for name in own}
            assert set(report["loaded"]) == expected_keys, (run, stage)
    assert exits_on_two_stages == set(MODELS)


def test_cli_prints_what_single_process_prints(model_dirs, launches, capsys):
    from eellm_hf import generate_cli

    assert generate_cli.main(_cli_args(model_dirs["plain"])) == 0
    single = capsys.readouterr().out
    _, results, _ = launches[2]
    assert results[0].stdout.split("CLI OUTPUT FOLLOWS\n", 1)[1] == single
    assert results[1].stdout.strip() == "CLI OUTPUT FOLLOWS"
    lines = [json.loads(line) for line in single.splitlines()]
    assert len(lines) == 2 and len({layer for line in lines for layer in line["exit_layers"]}) >= 2


def test_bad_layouts_are_refused_with_the_value(launches):
    _, _, ranks = launches[2]
    for report in ranks:
        assert "--pp 3 needs 3 processes" in report["errors"]["pp"] and "got 2" in report["errors"]["pp"]
        assert "[2, 2]" in report["errors"]["split"]


def test_dead_rank_ends_every_rank_with_a_clear_error(launches):
    """Rank 1 died in a decoding step (exit code 7): ranks 0 and 2 report it and exit non-zero."""
    _, results, _ = launches[3]
    info = "\n".join(f"rank {r.rank} rc={r.returncode}\n{r.stdout}\n{r.stderr[-1500:]}" for r in results)
    assert results[1].returncode == 7, info
    for r in (results[0], results[2]):
        assert r.returncode not in (0, None), info
        assert f"[rank {r.rank}/3] FATAL" in r.stderr and "peer rank probably died" in r.stderr, info


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    mode = sys.argv[1]
    if mode == "equivalence":
        _worker_equivalence(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
