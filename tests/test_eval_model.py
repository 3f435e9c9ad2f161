"""The ``eellm`` lm-eval model, the ``eellm-eval`` CLI and ``eellm-sweep``, on tiny models (CPU, offline)."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eellm_hf.eval import lm_eval_model
from eellm_hf.eval.lm_eval_model import EarlyExitLM, parse_layers, parse_threshold
from eellm_hf.eval.tasks import TASKS_DIR

LIMIT = 3  # docs per task


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls run several times faster on one thread than on two contended ones (shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _evaluate(model: str, model_args: str, tasks: list[str], log_samples: bool = False) -> dict:
    from lm_eval.tasks import TaskManager

    results = lm_eval_model.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=LIMIT,
        device="cpu",
        batch_size=4,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    assert results is not None
    return results


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    return {
        task: {name: value for name, value in res.items() if "," in name and "_stderr," not in name}
        for task, res in results["results"].items()
    }


def test_parse_model_args() -> None:
    assert parse_threshold(None) is None and parse_threshold("off") is None and parse_threshold("None") is None
    assert parse_threshold("0.8") == 0.8 and parse_threshold(1) == 1.0
    assert parse_layers("1|3") == [1, 3] and parse_layers("1;3") == [1, 3] and parse_layers(3) == [3]
    assert parse_layers([1, 3]) == [1, 3] and parse_layers(None) is None
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match="early_exit_threshold"):
            parse_threshold(bad)
    with pytest.raises(ValueError, match="exit_gate_threshold must be a number in \\[0, 1\\] or None, got '2'"):
        parse_threshold("2", "exit_gate_threshold")
    for bad in ("1,3", "one", "|", [1.5]):
        with pytest.raises(ValueError, match="active_exits"):
            parse_layers(bad)


def test_kjv_pack_eellm_threshold_off_equals_hf(tiny_early_exit_dir: Path) -> None:
    """lm-eval end to end on the task pack: plain ``hf`` (remote code) and ``eellm`` give the same numbers."""
    hf = _evaluate("hf", f"pretrained={tiny_early_exit_dir},dtype=float32,trust_remote_code=True", ["kjv_pack"],
                   log_samples=True)
    ee = _evaluate("eellm", f"pretrained={tiny_early_exit_dir},dtype=float32", ["kjv_pack"], log_samples=True)
    hf_metrics, ee_metrics = _metrics(hf), _metrics(ee)
    assert set(hf_metrics) >= {"kjv_perplexity", "kjv_cloze", "kjv_completion"}
    assert ee_metrics == hf_metrics
    for task in ("kjv_perplexity", "kjv_cloze", "kjv_completion"):  # every response, not just the aggregates
        responses = [sample["resps"] for sample in hf["samples"][task]]
        assert responses and [sample["resps"] for sample in ee["samples"][task]] == responses
    for task in ("kjv_perplexity", "kjv_cloze", "kjv_completion"):
        values = hf_metrics[task].values()
        assert values and all(isinstance(v, float) and math.isfinite(v) for v in values), hf_metrics[task]

    cost = ee["eellm_cost"]
    assert cost["early_exit_threshold"] is None and cost["scoring_layer"] == 4
    assert cost["generated_tokens"] > 0 and cost["tokens_per_exit"] == {"4": cost["generated_tokens"]}
    assert cost["mean_exit_layer"] == 4.0
    assert set(cost["wall_time_s"]) >= {"generate", "generate_until", "loglikelihood", "loglikelihood_rolling",
                                        "total"}
    assert set(hf["eellm_cost"]) == {"wall_time_s"}  # not an eellm model: wall time only


def test_exit_layer_scores_with_the_exit_head(tiny_early_exit_dir: Path) -> None:
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    context, continuation = "And God said", " Let there be light"
    model = AutoModelForCausalLM.from_pretrained(tiny_early_exit_dir, dtype=torch.float32).eval()

    def by_hand(lm: EarlyExitLM, exit_index: int | None) -> tuple[float, bool]:
        whole, ctx = lm.tok_encode(context + continuation), lm.tok_encode(context)  # as lm-eval's _encode_pair
        cont = whole[len(ctx):]
        with torch.no_grad():
            out = model(torch.tensor([whole[:-1]]))
        logits = out.logits if exit_index is None else out.exit_logits[exit_index]
        logprobs = torch.log_softmax(logits[0, -len(cont):].float(), dim=-1)
        target = torch.tensor(cont)
        score = logprobs.gather(-1, target[:, None]).sum().item()
        return score, bool((logprobs.argmax(-1) == target).all())

    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    scores = {}
    for layer, exit_index in ((1, 0), (3, 1), (4, None)):
        lm = EarlyExitLM(pretrained=str(tiny_early_exit_dir), exit_layer=layer, dtype="float32", device="cpu")
        assert lm.scoring_layer == layer
        (score, greedy), = lm.loglikelihood([request], disable_tqdm=True)
        expected, expected_greedy = by_hand(lm, exit_index)
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
        assert lm.cost()["exit_layer"] == layer and lm.cost()["wall_time_s"]["loglikelihood"] > 0
        scores[layer] = score
    assert len(set(scores.values())) == 3  # the heads really differ


def test_exit_layer_generates_from_that_exit(tiny_early_exit_dir: Path) -> None:
    """``exit_layer`` also makes every generated token leave at that exit. Needs early-exit generation."""
    from lm_eval.api.instance import Instance

    lm = EarlyExitLM(pretrained=str(tiny_early_exit_dir), exit_layer=1, dtype="float32", device="cpu")
    request = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("In the beginning", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}))
    (text,) = lm.generate_until([request], disable_tqdm=True)
    assert isinstance(text, str)
    cost = lm.cost()
    assert cost["generated_tokens"] > 0 and cost["tokens_per_exit"] == {"1": cost["generated_tokens"]}
    assert cost["mean_exit_layer"] == 1.0 and cost["exit_layer"] == 1


def test_speculative_generation_equals_full_depth(tiny_early_exit_dir: Path) -> None:
    """``early_exit_mode=speculative`` generates full depth's text for a batch of requests, and records drafts."""
    from lm_eval.api.instance import Instance

    contexts = ["In the beginning", "And God said, Let there be", "Jesus wept", "The LORD is my shepherd; I"]
    requests = [Instance(request_type="generate_until", doc={}, idx=index,
                         arguments=(context, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}))
                for index, context in enumerate(contexts)]
    full = EarlyExitLM(pretrained=str(tiny_early_exit_dir), dtype="float32", device="cpu", batch_size=4)
    spec = EarlyExitLM(pretrained=str(tiny_early_exit_dir), dtype="float32", device="cpu", batch_size=4,
                       early_exit_threshold="0.0", early_exit_mode="speculative", num_speculative_tokens="3",
                       stop_draft_when_unsure="true")
    assert spec.generate_until(requests, disable_tqdm=True) == full.generate_until(requests, disable_tqdm=True)
    cost = spec.cost()
    assert cost["early_exit_mode"] == "speculative" and cost["num_speculative_tokens"] == 3
    assert cost["draft_tokens"] > 0 and 0 <= cost["accepted_draft_tokens"] <= cost["draft_tokens"]


@pytest.mark.parametrize(
    "model_args, match",
    [
        ({"exit_layer": 2}, "exit_layer must be one of"),
        ({"active_exits": "2|3"}, r"active_exits \[2\] are not exits"),
        ({"early_exit_threshold": 1.5}, "early_exit_threshold"),
        ({"exit_confidence": "entropy"}, "exit_confidence"),
        ({"exit_layer": 1, "early_exit_threshold": 0.5}, "do not combine"),
        ({"max_recompute_tokens": 0}, "max_recompute_tokens"),
        ({"3": ""}, "active_exits=4|8"),  # what `active_exits=1,3` becomes after lm-eval's comma split
        ({"early_exit_mode": "fast", "early_exit_threshold": 0.5}, "early_exit_mode"),
        ({"early_exit_mode": "speculative"}, "needs early_exit_threshold"),
        ({"early_exit_mode": "speculative", "early_exit_threshold": 0.5, "num_speculative_tokens": 0},
         "num_speculative_tokens"),
        ({"early_exit_mode": "speculative", "early_exit_threshold": 0.5, "stop_draft_when_unsure": "maybe"},
         "stop_draft_when_unsure"),
    ],
)
def test_bad_model_args_raise(tiny_early_exit_dir: Path, model_args: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EarlyExitLM(pretrained=str(tiny_early_exit_dir), dtype="float32", device="cpu", **model_args)


def test_early_exit_args_need_an_early_exit_model(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="has no early exits"):
        EarlyExitLM(pretrained=str(tiny_llama_dir), early_exit_threshold=0.5, device="cpu")


def test_eellm_eval_cli_records_early_exit_cost(tiny_early_exit_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``eellm-eval`` with a threshold: every token leaves at the only active exit; the cost is saved and printed.

    Needs early-exit generation (``generation_early_exit``).
    """
    import lm_eval.tasks

    from eellm_hf.eval import cli

    class PackOnlyTaskManager(lm_eval.tasks.TaskManager):
        """Skips indexing lm-eval's thousands of built-in tasks (~20 s)."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", PackOnlyTaskManager)
    out = tmp_path / "results"
    cli.main([
        "--model", "eellm",
        "--model_args", f"pretrained={tiny_early_exit_dir},dtype=float32,early_exit_threshold=0.0,active_exits=3",
        "--tasks", "kjv_completion", "--include_path", str(TASKS_DIR), "--limit", "2", "--device", "cpu",
        "--batch_size", "2", "--gen_kwargs", "max_gen_toks=8", "--output_path", str(out),
    ])
    printed = capsys.readouterr().out
    assert "kjv_completion" in printed and "eellm cost" in printed and "mean exit layer" in printed
    (saved,) = out.rglob("results_*.json")
    results = json.loads(saved.read_text())
    cost = results["eellm_cost"]
    assert cost["early_exit_threshold"] == 0.0 and cost["active_exits"] == [3]
    assert cost["generated_tokens"] > 0 and cost["tokens_per_exit"] == {"3": cost["generated_tokens"]}
    assert cost["mean_exit_layer"] == 3.0 and cost["wall_time_s"]["total"] > 0
    assert 0.0 <= results["results"]["kjv_completion"]["rougeL,none"] <= 1.0


def test_python_m_eellm_hf_eval_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m eellm_hf.eval", "run", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("eellm_hf.eval", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert "--model_args" in capsys.readouterr().out


def test_sweep_writes_files(tiny_early_exit_dir: Path, tmp_path: Path) -> None:
    """``eellm-sweep`` on the completion task. Needs early-exit generation (``generation_early_exit``)."""
    from eellm_hf.eval import sweep

    out = tmp_path / "sweep"
    sweep.main([
        str(tiny_early_exit_dir), "--task", "kjv_completion", "--limit", "4", "--thresholds", "1.0", "0.5", "0.0",
        "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out), "--device", "cpu", "--repeats", "2",
    ])
    for name in ("sweep.csv", "sweep.json", "speed_quality.png", "exit_histogram.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [row["threshold"] for row in rows] == ["full", "1.0", "0.5", "0.0"]
    data = json.loads((out / "sweep.json").read_text())
    runs = {run["threshold"]: run for run in data["runs"]}
    full, zero = runs[None], runs[0.0]
    assert full["speedup"] == 1.0 and full["agreement"] == 1.0 and full["mean_exit_layer"] == 4.0
    assert zero["mean_exit_layer"] == 1.0 and set(zero["tokens_per_exit"]) == {"1"}
    for run in data["runs"]:
        assert 0.0 <= run["agreement"] <= 1.0 and run["speedup"] > 0
        if run["threshold"] is not None:  # timed next to full depth on the same batches
            assert run["full_depth_wall_time_s"] > 0 and run["wall_time_s"] > 0
            # per generated token: the paired time ratio scaled by how many tokens each side produced
            per_token = run["wall_time_speedup"] * run["tokens"] / full["tokens"]
            assert run["speedup"] == pytest.approx(per_token, rel=1e-12)
        assert 0.0 <= run["rougeL"] <= 1.0 and 0.0 <= run["exact_match"] <= 1.0
        assert sum(run["tokens_per_exit"].values()) == run["tokens"] > 0


def test_sweep_prompts_file(tiny_early_exit_dir: Path, tmp_path: Path) -> None:
    """A plain prompt file (no references): agreement only. Needs early-exit generation."""
    from eellm_hf.eval import sweep

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\nAnd God said\n\nBlessed are the\n")
    out = tmp_path / "sweep"
    sweep.main([str(tiny_early_exit_dir), "--prompts-file", str(prompts), "--thresholds", "0.9", "--max-new-tokens",
                "6", "--batch-size", "3", "--out", str(out), "--device", "cpu", "--active-exits", "3"])
    data = json.loads((out / "sweep.json").read_text())
    assert data["num_prompts"] == 3 and [run["threshold"] for run in data["runs"]] == [None, 0.9]
    assert set(data["runs"][1]["tokens_per_exit"]) <= {"3", "4"}
    assert (out / "speed_quality.png").is_file() and (out / "exit_histogram.png").is_file()


def test_sweep_speculative_mode(tiny_early_exit_dir: Path, tmp_path: Path) -> None:
    """``--early-exit-mode speculative``: every threshold's output is full depth's (agreement 1, the same ROUGE-L),
    and the rows report how many drafts the final head accepted; speculative flags without the mode are refused."""
    from eellm_hf.eval import sweep

    out = tmp_path / "sweep"
    sweep.main([
        str(tiny_early_exit_dir), "--task", "kjv_completion", "--limit", "3", "--thresholds", "0.5", "0.0",
        "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out), "--device", "cpu", "--repeats", "1",
        "--early-exit-mode", "speculative", "--num-speculative-tokens", "3", "--stop-draft-when-unsure",
    ])
    data = json.loads((out / "sweep.json").read_text())
    assert data["early_exit_mode"] == "speculative" and data["num_speculative_tokens"] == 3
    full, *speculative = data["runs"]
    for run in speculative:
        assert run["agreement"] == 1.0 and run["rougeL"] == full["rougeL"] and run["tokens"] == full["tokens"]
    zero = speculative[-1]  # threshold 0: every token is drafted at the first exit
    assert 0.0 <= zero["acceptance_rate"] <= 1.0
    with pytest.raises(SystemExit, match="need --early-exit-mode speculative"):
        sweep.main([str(tiny_early_exit_dir), "--task", "kjv_completion", "--num-speculative-tokens", "3",
                    "--out", str(tmp_path / "refused")])


def test_full_depth_stays_full_depth_when_the_export_recommends_early_exit(tiny_early_exit_dir: Path,
                                                                           tmp_path: Path) -> None:
    """An export's generation config may recommend early exit (the trainer's ``export_generation``): ``generate()``
    follows it, but the sweep's and lm-eval's full-depth runs must still run every layer."""
    import shutil

    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer, GenerationConfig

    from eellm_hf import EarlyExitGPTForCausalLM
    from eellm_hf.eval import sweep

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_early_exit_dir, model_dir)
    base = GenerationConfig.from_pretrained(model_dir)
    ids = {name: getattr(base, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**ids, early_exit_threshold=0.0).save_pretrained(model_dir)  # every token: the first exit
    model = EarlyExitGPTForCausalLM.from_pretrained(model_dir).eval()
    assert model.generation_config.early_exit_threshold == 0.0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [sweep.Prompt("In the beginning", None)]
    assert set(sweep.generate_batch(model, tokenizer, prompts, 0.0, 4).layers[0]) == {1}  # the recommendation
    assert set(sweep.generate_batch(model, tokenizer, prompts, None, 4).layers[0]) == {4}

    lm = EarlyExitLM(pretrained=str(model_dir), dtype="float32", device="cpu")
    request = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("In the beginning", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}))
    lm.generate_until([request], disable_tqdm=True)
    assert lm.cost()["mean_exit_layer"] == 4.0
