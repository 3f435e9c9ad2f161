"""Early-exit generation: exactness against a naive reference, batching, `generate` features, errors, cache
continuation, remote code and the CLI.

The reference (`naive_early_exit_greedy`) is the oracle of the design notes: no cache, the whole prefix at every
step, the first active exit whose confidence reaches the threshold. Models are tiny and run in float64, so that
cached and uncached computations cannot disagree on a decision through rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
from eellm_hf.modeling.generation_early_exit import EarlyExitDecoder, GenerateEarlyExitDecoderOnlyOutput

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
NEW_TOKENS = 12
EXIT_CONFIGS = {
    "plain": {},
    "exit_block": {"exit_block": True},
    "mlp_no_norm": {"exit_mlp": True, "exit_norm": False},
    "tied_heads": {"tie_exit_heads": True},
    # vocabulary-pruned exits: they predict among 24 of the 64 tokens only
    "shortlist": {"exit_vocab": list(range(1, VOCAB, 3))[:24]},
}


# ----------------------------------------------------------------------------------------------------- helpers


def tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float64, head_scale: float = 10.0, **overrides
) -> EarlyExitGPTForCausalLM:
    """A 6-layer model with exits after layers 2 and 4; exit heads scaled up so that they can be confident."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, exit_layers=[2, 4], max_position_embeddings=128, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    model = EarlyExitGPTForCausalLM(EarlyExitGPTConfig(**kwargs)).to(dtype).eval()
    with torch.no_grad():
        if model.config.tie_exit_heads:
            model.lm_head.weight.mul_(head_scale / 2)
        else:
            for head in model.exit_lm_heads:
                head.weight.mul_(head_scale)
    return model


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    probs = logits.double().softmax(-1)
    if measure == "max_prob":
        return probs.max(-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@torch.no_grad()
def naive_early_exit_greedy(model, input_ids, max_new_tokens, threshold, measure="max_prob", active_exits=None,
                            eos_token_id=None, gate_threshold=None):
    """The oracle: no cache; at each step the whole prefix, the first confident active exit, else the final head
    (`"gate_max_prob"`: the first exit whose gate reaches `gate_threshold` and largest probability `threshold`)."""
    config = model.config
    active = range(config.num_exits) if active_exits is None else [config.exit_layers.index(a) for a in active_exits]
    ids, layers = input_ids.clone(), []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, compute_exits=True)
        logits, layer = out.logits[0, -1], config.num_hidden_layers
        for index in active:
            if measure == "gate":
                score = torch.sigmoid(out.exit_gate_logits[index][0, -1].double())
            elif measure == "gate_max_prob":
                gate = torch.sigmoid(out.exit_gate_logits[index][0, -1].double())
                score = confidence(out.exit_logits[index][0, -1], "max_prob") if gate >= gate_threshold else -1.0
            else:
                score = confidence(out.exit_logits[index][0, -1], measure)
            if threshold is not None and score >= threshold:
                logits, layer = out.exit_logits[index][0, -1], config.exit_layers[index]
                break
        token = logits.argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        layers.append(layer)
        if eos_token_id is not None and token.item() == eos_token_id:
            break
    return ids, layers


@torch.no_grad()
def regime_threshold(model, regime: str, measure: str = "max_prob") -> float:
    """A threshold at which the first exit fires often, rarely, or in a mix with the second exit and the head."""
    torch.manual_seed(123)
    ids = torch.randint(1, VOCAB, (4, 24))
    exit_logits = model(input_ids=ids, compute_exits=True).exit_logits
    first = confidence(exit_logits[0], measure).flatten()
    second = confidence(exit_logits[1], measure).flatten()
    if regime == "often":
        return first.quantile(0.15).item()
    if regime == "rarely":
        return max(first.quantile(0.97).item(), second.quantile(0.9).item())
    # mix: the first exit fires about a third of the time, the second some of the rest
    return min(first.quantile(0.65).item(), second.quantile(0.75).item())


def prompts(lengths=(5, 9, 3), seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, length), generator=generator) for length in lengths]


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, width - row.shape[1]:] = row[0]
        mask[index, width - row.shape[1]:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def models() -> dict[str, EarlyExitGPTForCausalLM]:
    return {name: tiny_model(**overrides) for name, overrides in EXIT_CONFIGS.items()}


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("config_name", list(EXIT_CONFIGS))
@pytest.mark.parametrize("regime", ["often", "rarely", "mix"])
def test_greedy_matches_oracle(models, config_name, regime):
    model = models[config_name]
    threshold = regime_threshold(model, regime)
    layers_seen = Counter()
    for prompt in prompts(lengths=(6, 3)):
        expected, expected_layers = naive_early_exit_greedy(model, prompt, NEW_TOKENS, threshold)
        layers_seen.update(expected_layers)
        for cap in (None, 1, 3):
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                                 max_recompute_tokens=cap, return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected), (regime, cap)
            assert out.exit_layers[0].tolist() == expected_layers, (regime, cap)
            if model.config.exit_vocab is not None:  # a token an exit produced is on its shortlist
                produced = out.sequences[0, prompt.shape[1]:][out.exit_layers[0] < model.config.num_hidden_layers]
                assert set(produced.tolist()) <= set(model.config.exit_vocab)
    early = (layers_seen[2] + layers_seen[4]) / sum(layers_seen.values())
    if regime == "often":
        assert early >= 0.6, layers_seen
    elif regime == "rarely":
        assert 0 < early <= 0.35, layers_seen
    else:
        assert layers_seen[2] and layers_seen[6] and 0.2 <= early <= 0.8, layers_seen


@pytest.mark.parametrize("config_name", ["plain", "exit_block"])
def test_top2_margin_and_active_exits_match_oracle(models, config_name):
    model = models[config_name]
    threshold = regime_threshold(model, "mix", "top2_margin")
    for active in (None, [4]):
        for prompt in prompts(lengths=(7,)):
            expected, expected_layers = naive_early_exit_greedy(model, prompt, NEW_TOKENS, threshold, "top2_margin",
                                                                active_exits=active)
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                                 exit_confidence="top2_margin", active_exits=active, return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected)
            assert out.exit_layers[0].tolist() == expected_layers
            if active == [4]:
                assert 2 not in expected_layers
                assert out.early_exit_stats.exit_head_tokens[0] == 0  # nothing computed for an inactive exit


@pytest.fixture(scope="module", params=[{"exit_gate_before_mlp": False}, {"exit_gate_before_mlp": True},
                                        {"exit_gate_before_mlp": True, "exit_vocab": list(range(0, VOCAB, 2))}],
                ids=["gate_reads_output", "gate_before_mlp", "gate_before_mlp_shortlist"])
def gated_model(request) -> EarlyExitGPTForCausalLM:
    """Exits with confidence gates (random, scaled so that their probabilities spread over (0, 1)), reading the
    exit's output or (`exit_gate_before_mlp`) its state before the MLP; and with a vocabulary shortlist."""
    model = tiny_model(seed=3, exit_gate=True, exit_mlp=True, **request.param)
    with torch.no_grad():
        for exit_module in model.model.exits:
            exit_module.gate.weight.mul_(30.0)
    return model


@torch.no_grad()
def gate_threshold(model) -> float:
    """A gate threshold at which both exits and the final head produce tokens."""
    torch.manual_seed(123)
    gates = model(input_ids=torch.randint(1, VOCAB, (4, 24)), compute_exits=True).exit_gate_logits
    return min(torch.sigmoid(gates[0]).quantile(0.7).item(), torch.sigmoid(gates[1]).quantile(0.6).item())


def test_gate_confidence_matches_oracle_and_skips_projections(gated_model):
    """`exit_confidence="gate"`: the first exit whose gate probability reaches the threshold, as the no-cache
    oracle decides it; the vocabulary projection of an exit runs only for the tokens that leave there, and so does
    its MLP when the gate reads before it."""
    threshold = gate_threshold(gated_model)
    seen = Counter()
    for prompt in prompts(lengths=(6, 3, 8)):
        expected, expected_layers = naive_early_exit_greedy(gated_model, prompt, NEW_TOKENS, threshold, "gate")
        seen.update(expected_layers)
        for cap in (None, 2):
            out = gated_model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                                       exit_confidence="gate", max_recompute_tokens=cap, return_dict_in_generate=True)
            assert torch.equal(out.sequences, expected), cap
            assert out.exit_layers[0].tolist() == expected_layers, cap
            stats = out.early_exit_stats
            assert stats.exit_head_tokens == [stats.tokens_per_exit[2], stats.tokens_per_exit[4]]
            assert stats.exit_gate_tokens[0] > stats.exit_head_tokens[0]
            mlp_ran_for = stats.exit_head_tokens if gated_model.config.exit_gate_before_mlp else stats.exit_gate_tokens
            assert stats.exit_mlp_tokens == mlp_ran_for
    assert seen[2] and seen[4] and seen[6], seen


def test_gate_confidence_batch_equals_each_prompt_alone(gated_model):
    threshold = gate_threshold(gated_model)
    rows = prompts()
    ids, mask = left_pad(rows)
    out = gated_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                               exit_confidence="gate", return_dict_in_generate=True)
    for index, row in enumerate(rows):
        expected, expected_layers = naive_early_exit_greedy(gated_model, row, NEW_TOKENS, threshold, "gate")
        assert torch.equal(out.sequences[index, ids.shape[1]:], expected[0, row.shape[1]:])
        assert out.exit_layers[index].tolist() == expected_layers


@torch.no_grad()
def screen_and_prob_thresholds(model) -> tuple[float, float]:
    """A gate threshold that screens in about half the tokens, and a largest-probability threshold that about half
    of those reach: some screened-in tokens then leave and some go on."""
    torch.manual_seed(123)
    out = model(input_ids=torch.randint(1, VOCAB, (4, 24)), compute_exits=True)
    gates = torch.cat([torch.sigmoid(g.flatten()) for g in out.exit_gate_logits])
    probs = torch.cat([confidence(x, "max_prob").flatten() for x in out.exit_logits])
    return gates.quantile(0.5).item(), probs.quantile(0.5).item()


def test_gate_max_prob_matches_oracle(gated_model):
    """`exit_confidence="gate_max_prob"`: the gate screens (`exit_gate_threshold`), the largest probability
    decides; the exit's projection (and, with the gate before it, its MLP) runs only for the screened-in tokens.
    Single prompts and a left-padded batch equal the no-cache oracle with the same rule."""
    gate_t, prob_t = screen_and_prob_thresholds(gated_model)
    settings = dict(early_exit_threshold=prob_t, exit_confidence="gate_max_prob", exit_gate_threshold=gate_t,
                    return_dict_in_generate=True)
    seen, screened_in_but_stayed = Counter(), 0
    rows = prompts(lengths=(6, 3, 8))
    for prompt in rows:
        expected, expected_layers = naive_early_exit_greedy(gated_model, prompt, NEW_TOKENS, prob_t, "gate_max_prob",
                                                            gate_threshold=gate_t)
        seen.update(expected_layers)
        out = gated_model.generate(prompt, max_new_tokens=NEW_TOKENS, **settings)
        assert torch.equal(out.sequences, expected)
        assert out.exit_layers[0].tolist() == expected_layers
        stats = out.early_exit_stats
        assert stats.exit_gate_tokens[0] > stats.exit_head_tokens[0] >= stats.tokens_per_exit[2]
        screened_in_but_stayed += sum(stats.exit_head_tokens) - stats.tokens_per_exit[2] - stats.tokens_per_exit[4]
        mlp_ran_for = stats.exit_head_tokens if gated_model.config.exit_gate_before_mlp else stats.exit_gate_tokens
        assert stats.exit_mlp_tokens == mlp_ran_for
    assert seen[2] and seen[4] and seen[6] and screened_in_but_stayed > 0, seen
    ids, mask = left_pad(rows)
    out = gated_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **settings)
    for index, row in enumerate(rows):
        expected, expected_layers = naive_early_exit_greedy(gated_model, row, NEW_TOKENS, prob_t, "gate_max_prob",
                                                            gate_threshold=gate_t)
        assert torch.equal(out.sequences[index, ids.shape[1]:], expected[0, row.shape[1]:])
        assert out.exit_layers[index].tolist() == expected_layers


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "needs `exit_gate_threshold`"),
    ({"exit_gate_threshold": 1.5}, "`exit_gate_threshold` must be None or a number in \\[0, 1\\], got 1.5"),
    ({"exit_gate_threshold": "0.5"}, "`exit_gate_threshold` must be None or a number in \\[0, 1\\], got '0.5'"),
])
def test_gate_max_prob_needs_a_gate_threshold(gated_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gated_model.generate(prompts(lengths=(3,))[0], max_new_tokens=2, early_exit_threshold=0.5,
                             exit_confidence="gate_max_prob", **kwargs)


def test_gate_confidence_needs_gates(models):
    with pytest.raises(ValueError, match="exit_confidence='gate'.*config.exit_gate"):
        models["plain"].generate(prompts(lengths=(3,))[0], max_new_tokens=2, early_exit_threshold=0.5,
                                 exit_confidence="gate")


def test_threshold_zero_always_exits_at_first_active_exit(models):
    model = models["plain"]
    prompt = prompts(lengths=(5,))[0]
    expected, expected_layers = naive_early_exit_greedy(model, prompt, NEW_TOKENS, 0.0)
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert set(out.exit_layers.flatten().tolist()) == {2} == set(expected_layers)
    out = model.generate(prompt, max_new_tokens=4, early_exit_threshold=0.0, active_exits=[4],
                         return_dict_in_generate=True)
    assert set(out.exit_layers.flatten().tolist()) == {4}


def test_batches_above_early_exit_max_batch_size_decode_at_full_depth(tmp_path, models):
    """`early_exit_max_batch_size`: a batch within it exits early (threshold 0: always at the first exit), a larger
    one (num_return_sequences counted) is transformers' own full-depth greedy; saved with the model like the
    other settings."""
    model = models["plain"]
    one = prompts(lengths=(5,))[0]
    out = model.generate(one, max_new_tokens=NEW_TOKENS, early_exit_threshold=0.0, early_exit_max_batch_size=1,
                         return_dict_in_generate=True)
    assert set(out.exit_layers.flatten().tolist()) == {2}
    input_ids, attention_mask = left_pad(prompts())
    full = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS)
    capped = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                            early_exit_threshold=0.0, early_exit_max_batch_size=2, return_dict_in_generate=True)
    assert torch.equal(capped.sequences, full)
    assert getattr(capped, "early_exit_stats", None) is None  # transformers' own loop ran
    within = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                            early_exit_threshold=0.0, early_exit_max_batch_size=3, return_dict_in_generate=True)
    assert set(within.exit_layers.flatten().tolist()) - {-1} == {2}
    repeated = model.generate(one, max_new_tokens=4, early_exit_threshold=0.0, early_exit_max_batch_size=1,
                              num_return_sequences=2, do_sample=True, return_dict_in_generate=True)
    assert getattr(repeated, "early_exit_stats", None) is None
    model.save_pretrained(tmp_path)
    GenerationConfig(early_exit_threshold=0.0, early_exit_max_batch_size=2, pad_token_id=0).save_pretrained(tmp_path)
    loaded = EarlyExitGPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert torch.equal(loaded.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS), full)


@pytest.mark.parametrize("config_name", ["plain", "exit_block"])
@pytest.mark.parametrize("cap", [None, 2])
def test_left_padded_batch_equals_each_prompt_alone(models, config_name, cap):
    model = models[config_name]
    threshold = regime_threshold(model, "mix")
    rows = prompts()
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                         max_recompute_tokens=cap, return_dict_in_generate=True)
    assert out.exit_layers.shape == (len(rows), NEW_TOKENS)
    all_layers = set()
    for index, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                               max_recompute_tokens=cap, return_dict_in_generate=True)
        assert torch.equal(out.sequences[index, ids.shape[1]:], alone.sequences[0, row.shape[1]:])
        assert torch.equal(out.exit_layers[index], alone.exit_layers[0])
        all_layers.update(alone.exit_layers[0].tolist())
    assert len(all_layers) >= 2  # the rows really exit at different depths


def test_max_recompute_tokens_bounds_the_tokens_a_layer_runs(models, monkeypatch):
    model = models["plain"]
    threshold = regime_threshold(model, "often")
    widest = []
    original = EarlyExitDecoder._count

    def record(self, kind, work, starts, start, end, **kwargs):
        if kind == "decode":
            widest.append(max(end - row_start for row_start in starts))
        return original(self, kind, work, starts, start, end, **kwargs)

    monkeypatch.setattr(EarlyExitDecoder, "_count", record)
    prompt = prompts(lengths=(4,))[0]
    for cap in (1, 2):
        widest.clear()
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                             max_recompute_tokens=cap, return_dict_in_generate=True)
        assert max(widest) == cap
        assert (cap == 1) == (out.early_exit_stats.recomputed_tokens == 0)
    widest.clear()
    model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold)
    assert max(widest) > 2  # without a cap the backlog grows further


# ------------------------------------------------------------------------------------ full depth = transformers


def test_threshold_none_is_transformers_greedy_and_llama():
    model = tiny_model(dtype=torch.float32)
    ids, mask = left_pad(prompts())
    llama_config = LlamaConfig(**{key: getattr(model.config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "pad_token_id")},
        bos_token_id=None, eos_token_id=None)
    llama = LlamaForCausalLM(llama_config).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith(("model.exits.", "exit_lm_heads.")) for key in unexpected)

    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours, model.generate(ids, early_exit_threshold=None, **kwargs))
    from transformers.generation import GenerationMixin
    assert torch.equal(ours, GenerationMixin.generate(model, ids, **kwargs))
    assert torch.equal(ours, llama.generate(ids, **kwargs))
    # an explicit None overrides a threshold saved in the generation config
    model.generation_config.early_exit_threshold = 0.0
    try:
        assert torch.equal(ours, model.generate(ids, early_exit_threshold=None, **kwargs))
    finally:
        del model.generation_config.early_exit_threshold


def test_early_exit_loop_at_full_depth_equals_transformers_greedy(models):
    """With no exit allowed to fire, the early-exit loop (own KV, masks, positions) must be transformers' greedy."""
    model = models["exit_block"]
    ids, mask = left_pad(prompts())
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, early_exit_threshold=0.5,
                         active_exits=[], return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert set(out.exit_layers.flatten().tolist()) == {6}
    assert out.early_exit_stats.tokens_per_exit == {6: ids.shape[0] * NEW_TOKENS}


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                                 (torch.float64, torch.float64)])
def test_confidence_is_float32_or_wider(dtype, expected, monkeypatch):
    model = tiny_model(dtype=dtype)
    seen = []
    original = EarlyExitDecoder._fire

    def record(self, logits):
        seen.append(self.confidence_dtype)
        return original(self, logits)

    monkeypatch.setattr(EarlyExitDecoder, "_fire", record)
    out = model.generate(prompts(lengths=(4,))[0], max_new_tokens=3, early_exit_threshold=0.05,
                         output_logits=True, return_dict_in_generate=True)
    assert seen and set(seen) == {expected}
    assert out.logits[0].dtype == expected


# ----------------------------------------------------------------------------------------- generate features


def test_sampling_with_seed_and_top_k(models):
    model = models["plain"]
    threshold = regime_threshold(model, "mix")
    prompt = prompts(lengths=(5,))[0]
    greedy = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold)
    top1 = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold, do_sample=True,
                              temperature=1.5, top_k=20, top_p=0.95, num_return_sequences=3)

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (3, prompt.shape[1] + NEW_TOKENS)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert ((first >= 0) & (first < VOCAB)).all()


def test_logits_processors_scores_and_logits(models):
    model = models["plain"]
    threshold = regime_threshold(model, "mix")
    prompt = prompts(lengths=(5,))[0]
    banned = 7
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold, bad_words_ids=[[banned]],
                         repetition_penalty=1.3, output_scores=True, output_logits=True, return_dict_in_generate=True)
    assert isinstance(out, GenerateEarlyExitDecoderOnlyOutput)
    assert len(out.scores) == len(out.logits) == NEW_TOKENS
    assert banned not in out.sequences[0, prompt.shape[1]:].tolist()
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        assert scores.shape == logits.shape == (1, VOCAB)
        assert scores[0, banned] == -math.inf
        assert out.sequences[0, prompt.shape[1] + step] == scores[0].argmax()


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_token(models):
    model = models["plain"]
    threshold = regime_threshold(model, "mix")
    prompt = prompts(lengths=(5,))[0]
    streamer = CollectingStreamer()
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == prompt[0].tolist()
    assert [chunk[0] for chunk in streamer.chunks[1:]] == out[0, prompt.shape[1]:].tolist()


def test_text_streamer(tiny_llama_dir, capsys):
    from transformers import AutoTokenizer, TextStreamer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = tiny_model(vocab_size=len(tokenizer), head_scale=1.0)
    encoded = tokenizer(["In the beginning"], return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=6, early_exit_threshold=0.0,
                         streamer=TextStreamer(tokenizer, skip_special_tokens=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_stop_strings_with_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = tiny_model(vocab_size=len(tokenizer), head_scale=1.0)
    encoded = tokenizer(["In the beginning"], return_tensors="pt")
    prompt_length = encoded["input_ids"].shape[1]
    full = model.generate(**encoded, max_new_tokens=12, early_exit_threshold=0.0)
    pieces = [tokenizer.decode(token) for token in full[0, prompt_length + 2: -1]]
    stop = next(piece for piece in pieces if piece.strip() and piece.isascii() and piece.isprintable())
    stopped = model.generate(**encoded, max_new_tokens=12, early_exit_threshold=0.0, stop_strings=[stop],
                             tokenizer=tokenizer)
    assert stopped.shape[1] < full.shape[1]
    assert tokenizer.decode(stopped[0, prompt_length:]).endswith(stop)
    assert torch.equal(stopped[0], full[0, : stopped.shape[1]])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**encoded, max_new_tokens=2, early_exit_threshold=0.0, stop_strings=[stop])


def test_eos_pad_and_stopping_criteria(models):
    model = models["plain"]
    threshold = regime_threshold(model, "mix")
    rows = prompts()
    runs = [naive_early_exit_greedy(model, row, NEW_TOKENS, threshold) for row in rows]
    # stop the first row at its 4th new token
    eos = runs[0][0][0, rows[0].shape[1] + 3].item()
    pad = 0
    ids, mask = left_pad(rows, pad)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                         eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True)
    width = ids.shape[1]
    for index, row in enumerate(rows):
        expected, layers = naive_early_exit_greedy(model, row, NEW_TOKENS, threshold, eos_token_id=eos)
        new = expected[0, row.shape[1]:].tolist()
        got = out.sequences[index, width:].tolist()
        assert got[: len(new)] == new
        assert all(token == pad for token in got[len(new):])
        assert out.exit_layers[index, : len(layers)].tolist() == layers
        assert (out.exit_layers[index, len(layers):] == -1).all()
    assert out.early_exit_stats.num_tokens == int((out.exit_layers >= 0).sum())

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= width + 3, dtype=torch.bool)

    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, early_exit_threshold=threshold,
                             stopping_criteria=StoppingCriteriaList([StopAtLength()]))
    assert stopped.shape[1] == width + 3
    assert model.generate(ids, attention_mask=mask, max_length=width + 5,
                          early_exit_threshold=threshold).shape[1] == width + 5


def test_lm_eval_call_signature_with_threshold_in_generation_config(models):
    model = models["plain"]
    threshold = regime_threshold(model, "mix")
    rows = prompts()
    ids, mask = left_pad(rows)

    class NeverStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model.generation_config.early_exit_threshold = threshold
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 6,
                             stopping_criteria=StoppingCriteriaList([NeverStop()]), pad_token_id=0, use_cache=True,
                             do_sample=False)
    finally:
        del model.generation_config.early_exit_threshold
    for index, row in enumerate(rows):
        expected, _ = naive_early_exit_greedy(model, row, 6, threshold)
        assert out[index, ids.shape[1]:].tolist() == expected[0, row.shape[1]:].tolist()


def test_settings_saved_in_generation_config(tmp_path, models):
    model = models["exit_block"]
    threshold = regime_threshold(model, "mix")
    prompt = prompts(lengths=(5,))[0]
    expected = model.generate(prompt, max_new_tokens=6, early_exit_threshold=threshold, active_exits=[2])
    model.save_pretrained(tmp_path)
    GenerationConfig(early_exit_threshold=threshold, active_exits=[2], pad_token_id=0).save_pretrained(tmp_path)
    loaded = EarlyExitGPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.generation_config.early_exit_threshold == threshold
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6), expected)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs", [
    {"early_exit_threshold": -0.1},
    {"early_exit_threshold": 1.5},
    {"early_exit_threshold": float("nan")},
    {"early_exit_threshold": "0.5"},
    {"early_exit_threshold": 0.5, "active_exits": [3]},
    {"early_exit_threshold": 0.5, "active_exits": 2},
    {"early_exit_threshold": None, "active_exits": [2, 5]},
    {"early_exit_threshold": 0.5, "exit_confidence": "entropy"},
    {"early_exit_threshold": 0.5, "max_recompute_tokens": 0},
    {"early_exit_threshold": 0.5, "early_exit_max_batch_size": 0},
    {"early_exit_threshold": 0.5, "early_exit_max_batch_size": 1.5},
])
def test_bad_settings_raise_value_error(models, kwargs):
    with pytest.raises(ValueError, match="early_exit_threshold|active_exits|exit_confidence|max_recompute_tokens|"
                                         "early_exit_max_batch_size"):
        models["plain"].generate(prompts(lengths=(3,))[0], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(("kwargs", "mode"), [
    ({"num_beams": 2}, "beam search"),
    ({"num_beams": 2, "do_sample": True}, "beam sampling"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
    ({"prompt_lookup_num_tokens": 2}, "assisted decoding"),
    ({"assistant_model": "self"}, "assisted decoding"),
])
def test_unsupported_modes_raise_not_implemented(models, kwargs, mode):
    model = models["plain"]
    if kwargs.get("assistant_model") == "self":
        kwargs = {"assistant_model": model}
    with pytest.raises(NotImplementedError, match=mode):
        model.generate(prompts(lengths=(3,))[0], max_new_tokens=2, early_exit_threshold=0.5, **kwargs)


# -------------------------------------------------------------------------------------------------- caches


def full_forward_cache(model, sequences, attention_mask=None):
    """The KV cache of one forward pass over `sequences` (positions counted from each row's first token)."""
    position_ids = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 compute_exits=True).cache


def assert_same_cache(cache, reference, layers, mask=None):
    """Keys/values equal at every cache layer, on the columns `mask` keeps (all when None)."""
    for layer in layers:
        for got, want in ((cache.layers[layer].keys, reference.layers[layer].keys),
                          (cache.layers[layer].values, reference.layers[layer].values)):
            assert got.shape == want.shape
            if mask is not None:
                got, want = got.transpose(1, 2)[mask.bool()], want.transpose(1, 2)[mask.bool()]
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cap", [None, 3])
def test_returned_cache_is_complete_and_continuation_is_exact(models, cap):
    model = models["exit_block"]
    threshold = regime_threshold(model, "often")
    ids, mask = left_pad(prompts(lengths=(5, 8)))
    kwargs = dict(early_exit_threshold=threshold, max_recompute_tokens=cap)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True, **kwargs)
    assert (first.exit_layers < 6).float().mean() >= 0.5  # most tokens left early: their deep KV was missing
    seq = first.sequences
    seq_mask = torch.cat([mask, mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])], dim=1)
    assert first.cache.get_seq_length() == seq.shape[1] - 1
    reference = full_forward_cache(model, seq[:, :-1], seq_mask[:, :-1])
    assert_same_cache(first.cache, reference, range(6 + 2), seq_mask[:, :-1])

    more = model.generate(seq, attention_mask=seq_mask, cache=first.cache, max_new_tokens=5, **kwargs)
    one_shot = model.generate(ids, attention_mask=mask, max_new_tokens=10, **kwargs)
    assert torch.equal(more, one_shot)


def test_continuation_across_settings_and_user_cache(models):
    model = models["exit_block"]
    threshold = regime_threshold(model, "mix")
    prompt = prompts(lengths=(6,))[0]

    # plain generation keeps no exit-block KV; early exit catches it up from the cache it is given
    plain = model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True)
    expected, _ = naive_early_exit_greedy(model, plain.sequences, 4, threshold)
    cont = model.generate(plain.sequences, cache=plain.cache, max_new_tokens=4, early_exit_threshold=threshold)
    assert torch.equal(cont, expected)

    # the first call keeps only exit 4's block KV; the second also needs exit 2's
    first = model.generate(prompt, max_new_tokens=4, early_exit_threshold=threshold, active_exits=[4],
                           return_dict_in_generate=True)
    expected, _ = naive_early_exit_greedy(model, first.sequences, 4, threshold)
    cont = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, early_exit_threshold=threshold)
    assert torch.equal(cont, expected)

    # a cache the caller passes is filled in place; plain generation continues from it exactly
    cache = DynamicCache()
    out = model.generate(prompt, cache=cache, max_new_tokens=6, early_exit_threshold=threshold)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert_same_cache(cache, full_forward_cache(model, out[:, :-1]), range(6 + 2))
    assert torch.equal(model.generate(out, cache=cache, max_new_tokens=3), model.generate(out, max_new_tokens=3))


# ----------------------------------------------------------------------------------------- remote code, CLI


REMOTE_SCRIPT = r"""
import importlib.util, json, sys
repo = sys.argv[2]
sys.path = [p for p in sys.path if p and p.rstrip("/") != repo and "__editable__" not in p]
sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path_hooks = [h for h in sys.path_hooks if "Editable" not in getattr(h, "__qualname__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("eellm_hf") is None, "eellm_hf must not be importable here"
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64).eval()
assert "eellm_hf" not in sys.modules and "eellm_hf" not in type(model).__module__
out = model.generate(torch.tensor([json.loads(sys.argv[3])]), max_new_tokens=8, return_dict_in_generate=True)
spec = model.generate(torch.tensor([json.loads(sys.argv[3])]), max_new_tokens=8, return_dict_in_generate=True,
                      early_exit_mode="speculative", num_speculative_tokens=3)
print(json.dumps({"sequences": out.sequences.tolist(), "exit_layers": out.exit_layers.tolist(),
                  "module": type(model).__module__, "speculative": spec.sequences.tolist(),
                  "speculative_module": type(spec.early_exit_stats).__module__}))
"""


def test_remote_code_generate_without_eellm_hf(tmp_path, models):
    model = models["exit_block"]
    threshold = regime_threshold(model, "mix")
    model.save_pretrained(tmp_path / "model")
    GenerationConfig(early_exit_threshold=threshold, pad_token_id=0).save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "generation_early_exit.py").exists()
    assert (tmp_path / "model" / "speculative_early_exit.py").exists()
    assert (tmp_path / "model" / "early_exit_decoder.py").exists()
    assert (tmp_path / "model" / "early_exit_settings.py").exists()
    prompt = prompts(lengths=(6,))[0]
    expected = model.generate(prompt, max_new_tokens=8, early_exit_threshold=threshold, return_dict_in_generate=True)
    full_depth = model.generate(prompt, max_new_tokens=8, do_sample=False)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(tmp_path / "model"), str(REPO_ROOT),
         json.dumps(prompt[0].tolist())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules")
    assert remote["sequences"] == expected.sequences.tolist()
    assert remote["exit_layers"] == expected.exit_layers.tolist()
    assert remote["speculative"] == full_depth.tolist()
    assert remote["speculative_module"].startswith("transformers_modules")


@pytest.fixture(scope="module")
def cli_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("ee_cli_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(out)
    model = tiny_model(dtype=torch.float32, vocab_size=len(tokenizer), head_scale=1.0,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    return out


def test_cli_json(cli_model_dir, capsys):
    from transformers import AutoTokenizer

    from eellm_hf.generate_cli import main

    texts = ["In the beginning", "And God said, Let there be light"]
    assert main([str(cli_model_dir), "--prompt", texts[0], "--prompt", texts[1], "--max-new-tokens", "5",
                 "--early-exit-threshold", "0", "--json"]) in (0, None)
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    tokenizer = AutoTokenizer.from_pretrained(cli_model_dir)
    model = EarlyExitGPTForCausalLM.from_pretrained(cli_model_dir).eval()
    for text, line in zip(texts, lines):
        assert {"text", "token_ids", "exit_layers"} <= set(line)
        encoded = tokenizer([text], return_tensors="pt")
        out = model.generate(**encoded, max_new_tokens=5, early_exit_threshold=0.0, return_dict_in_generate=True)
        new = out.sequences[0, encoded["input_ids"].shape[1]:].tolist()
        assert line["token_ids"] == new[: len(line["token_ids"])] and line["token_ids"]
        assert line["exit_layers"] == [2] * len(line["token_ids"])
        assert line["text"] == tokenizer.decode(line["token_ids"], skip_special_tokens=True)


def test_cli_speculative_equals_full_depth(cli_model_dir, capsys):
    from eellm_hf.generate_cli import main

    arguments = [str(cli_model_dir), "--prompt", "In the beginning", "--prompt", "And God said, Let there be light",
                 "--max-new-tokens", "6", "--json"]
    assert main(arguments) in (0, None)
    full = capsys.readouterr().out
    assert main([*arguments, "--early-exit-threshold", "0.2", "--early-exit-mode", "speculative",
                 "--num-speculative-tokens", "3", "--stop-draft-when-unsure"]) in (0, None)
    spec = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["token_ids"] for line in spec] == [json.loads(line)["token_ids"] for line in full.splitlines()]


def test_cli_module_entry_point(cli_model_dir, capsys, monkeypatch):
    import runpy

    monkeypatch.delitem(sys.modules, "eellm_hf.generate_cli", raising=False)
    monkeypatch.setattr(sys, "argv", ["eellm-generate", str(cli_model_dir), "--prompt", "Jesus wept",
                                      "--max-new-tokens", "3"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("eellm_hf.generate_cli", run_name="__main__")
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out.strip()
