"""``eellm-calibrate``: the p-value's validity, the guarantee over repeated calibration draws, the CLI end to end
(held-out agreement, ``--write``, the lm-eval metric variant) and its errors, on a tiny model (CPU, offline)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from eellm_hf.eval.calibrate import (
    binomial_cdf,
    calibrate_from_args,
    hoeffding_bentkus_p_value,
    learn_then_test,
    risk_upper_bound,
)
from eellm_hf.eval.sweep import Prompt, generate, prompt_agreements

THRESHOLDS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
NEW_TOKENS = 8
POOL = 160  # recorded prompts; the CLI calibrates on the first half, the second half is held out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def agreeing_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer EarlyExitGPT (exits after 1 and 2) with the tiny tokenizer, whose exits start from the final head
    and whose later layers are damped: agreement with full depth falls gradually as the threshold falls."""
    from transformers import AutoTokenizer

    from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM

    out = tmp_path_factory.mktemp("calibrate_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = EarlyExitGPTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, exit_layers=[1, 2],
                                max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    model = EarlyExitGPTForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.5)
            layer.mlp.down_proj.weight.mul_(0.5)
        for head in model.exit_lm_heads:
            head.weight.copy_(model.lm_head.weight)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def verses() -> list[str]:
    from eellm_hf.corpus import training_verses

    texts = [verse["text"] for verse in training_verses()[5000:5000 + 2 * POOL:2]]
    return [" ".join(text.split()[:6]) for text in texts]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------- statistics


def test_binomial_cdf_and_bound():
    assert binomial_cdf(3, 10, 0.3) == pytest.approx(sum(math.comb(10, i) * 0.3**i * 0.7 ** (10 - i)
                                                         for i in range(4)), rel=1e-12)
    assert binomial_cdf(-1, 5, 0.5) == 0.0 and binomial_cdf(5, 5, 0.5) == 1.0
    assert hoeffding_bentkus_p_value(0.3, 100, 0.2) == 1.0  # mean above the level: no evidence
    assert hoeffding_bentkus_p_value(0.0, 100, 0.05) == pytest.approx(0.95**100)  # Hoeffding < e * Bentkus here
    bound = risk_upper_bound(0.1, 200, 0.1)
    assert 0.1 < bound < 0.2
    assert hoeffding_bentkus_p_value(0.1, 200, bound) <= 0.1 < hoeffding_bentkus_p_value(0.1, 200, bound - 1e-4)


def test_p_value_is_valid_at_the_boundary():
    """Bernoulli losses whose risk is exactly alpha: P(p-value <= delta) <= delta (a valid p-value)."""
    generator = torch.Generator().manual_seed(0)
    n, alpha, delta, repeats = 80, 0.15, 0.1, 4000
    means = (torch.rand(repeats, n, generator=generator) < alpha).double().mean(dim=1).tolist()
    rejections = sum(hoeffding_bentkus_p_value(mean, n, alpha) <= delta for mean in means) / repeats
    assert rejections <= delta


def test_fixed_sequence_stops_at_the_first_failure():
    good, bad = [0.0] * 100, [0.5] * 100
    assert learn_then_test([good, good, bad, good], alpha=0.1, delta=0.1)[0] == 1
    assert learn_then_test([bad, good], alpha=0.1, delta=0.1)[0] is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learn_then_test([[1.5]], alpha=0.1, delta=0.1)


# ---------------------------------------------------------------------------------------------- the guarantee


@pytest.fixture(scope="module")
def recorded_losses(agreeing_dir: Path, verses: list[str]) -> list[list[float]]:
    """Per threshold (strict to loose), per prompt: 1 - token agreement with full depth, on the pool."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(agreeing_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(agreeing_dir).eval()
    prompts = [Prompt(text) for text in verses]
    full = generate(model, tokenizer, prompts, None, NEW_TOKENS, batch_size=40).tokens
    return [[1.0 - agreement for agreement in prompt_agreements(
        generate(model, tokenizer, prompts, threshold, NEW_TOKENS, batch_size=40).tokens, full)]
        for threshold in THRESHOLDS]


def test_guarantee_holds_over_repeated_calibration_draws(recorded_losses):
    """The recorded prompts are the population: calibration sets drawn from it i.i.d. choose a threshold whose
    population risk exceeds alpha at most delta of the time; choosing by the empirical mean alone fails far more."""
    risks = [sum(losses) / len(losses) for losses in recorded_losses]
    assert risks[0] == 0.0 and risks[-1] > 0.3, risks
    # alpha just below a threshold's population risk: the empirical choice often picks it, and is then wrong
    step = next(j for j in range(1, len(risks)) if risks[j] > 0.05)
    alpha = risks[step] - 0.01
    assert alpha > risks[step - 1]
    rng, n, delta, repeats = random.Random(0), 60, 0.1, 400
    ltt_failures = naive_failures = 0
    for _ in range(repeats):
        sample = [rng.randrange(len(recorded_losses[0])) for _ in range(n)]
        draws = [[losses[i] for i in sample] for losses in recorded_losses]
        chosen, _ = learn_then_test(draws, alpha, delta)
        ltt_failures += chosen is not None and risks[chosen] > alpha
        naive = max((j for j, draw in enumerate(draws) if sum(draw) / n <= alpha), default=None)
        naive_failures += naive is not None and risks[naive] > alpha
    assert ltt_failures / repeats <= delta
    assert naive_failures / repeats > 2 * delta


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_meets_the_target_on_held_out_text_and_writes(agreeing_dir, verses, recorded_losses, tmp_path, capsys):
    calibration = _write_lines(tmp_path / "calibration.txt", verses[:POOL // 2])
    target = 0.8
    result = calibrate_from_args([str(agreeing_dir), "--data", str(calibration), "--target-agreement", str(target),
                                  "--delta", "0.1", "--thresholds", *map(str, THRESHOLDS), "--max-new-tokens",
                                  str(NEW_TOKENS), "--batch-size", "40", "--out", str(tmp_path / "out"), "--write"])
    printed = capsys.readouterr().out
    chosen = result["threshold"]
    assert chosen is not None and chosen < 1.0, printed
    assert f"chosen threshold: {chosen:g}" in printed and "bound" in printed
    assert (tmp_path / "out" / "calibration.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert [point["threshold"] for point in saved["points"]] == THRESHOLDS
    assert all(point["quality_bound"] <= point["quality"] for point in saved["points"])
    config = json.loads((agreeing_dir / "generation_config.json").read_text())
    assert config["early_exit_threshold"] == chosen
    held_out = recorded_losses[THRESHOLDS.index(chosen)][POOL // 2:]  # the other half of the pool
    assert 1.0 - sum(held_out) / len(held_out) >= target


def test_cli_with_an_lm_eval_metric(agreeing_dir, tmp_path, capsys):
    result = calibrate_from_args([str(agreeing_dir), "--target-task", "kjv_completion", "--target-metric", "rougeL",
                                  "--max-drop", "0.05", "--prompts", "24", "--thresholds", "1.0", "0.0",
                                  "--max-new-tokens", "6", "--batch-size", "24", "--out", str(tmp_path)])
    assert result["metric"] == "rougeL" and result["num_prompts"] == 24
    assert result["points"][0]["quality"] == pytest.approx(result["full_depth_quality"])
    assert "rougeL" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--target-agreement", "1.5"], "--target-agreement must be in"),
    (["--target-agreement", "0"], "--target-agreement must be in"),
    (["--target-agreement", "0.9", "--delta", "1"], "--delta"),
    (["--target-agreement", "0.9", "--thresholds", "2"], "--thresholds"),
    ([], "needs --target-agreement"),
])
def test_bad_arguments(agreeing_dir, verses, tmp_path, extra, message):
    data = _write_lines(tmp_path / "prompts.txt", verses[:3])
    with pytest.raises(SystemExit, match=message):
        calibrate_from_args([str(agreeing_dir), "--data", str(data), *extra])


def test_empty_data_and_model_without_exits(agreeing_dir, tiny_llama_dir, verses, tmp_path):
    empty = _write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(SystemExit, match="No prompts"):
        calibrate_from_args([str(agreeing_dir), "--data", str(empty), "--target-agreement", "0.9"])
    data = _write_lines(tmp_path / "prompts.jsonl", [json.dumps({"text": verse}) for verse in verses[:3]])
    with pytest.raises(SystemExit, match="no early exits"):
        calibrate_from_args([str(tiny_llama_dir), "--data", str(data), "--target-agreement", "0.9"])
    with pytest.raises(SystemExit, match="not a file"):
        calibrate_from_args([str(agreeing_dir), "--data", str(tmp_path / "missing.txt"), "--target-agreement", "0.9"])
