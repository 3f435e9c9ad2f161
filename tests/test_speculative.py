"""Speculative early exit: greedy output identical to full depth, sampling distribution equal to full depth.

Oracles: transformers' own full-depth greedy decoding on the same model (token for token, batched and left-padded),
and the exact full-depth distribution of the first generated tokens, enumerated with plain forward passes.
Models are tiny and in float64. Random exits rarely agree with the final head, so `agreeing_model` damps the
layers after the first exit and starts the exits from the final head's weights (as `eellm-convert` does): drafts
are then often, not always, accepted, and both paths of every round are exercised.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import VOCAB, gate_threshold, left_pad, prompts, regime_threshold, tiny_model
from transformers import GenerationConfig

from eellm_hf import EarlyExitGPTForCausalLM

CONFIGS = {
    "plain": {},
    "exit_block": {"exit_block": True},
    "mlp_no_norm": {"exit_mlp": True, "exit_norm": False},
    "tied_heads": {"tie_exit_heads": True},
    "shortlist": {"tie_exit_heads": True, "exit_vocab": list(range(0, VOCAB, 2))},  # exits draft among half the tokens
}


def agreeing_model(seed: int = 0, damping: float = 0.15, **overrides) -> EarlyExitGPTForCausalLM:
    """A tiny model whose exits often (not always) predict the final head's token."""
    model = tiny_model(seed=seed, head_scale=1.0, **overrides)
    first_exit = model.config.exit_layers[0]
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        for layer in model.model.layers[first_exit:]:
            layer.self_attn.o_proj.weight.mul_(damping)
            layer.mlp.down_proj.weight.mul_(damping)
        for index, exit_module in enumerate(model.model.exits):
            if hasattr(exit_module, "block"):
                exit_module.block.self_attn.o_proj.weight.mul_(damping)
                exit_module.block.mlp.down_proj.weight.mul_(damping)
            if hasattr(exit_module, "mlp"):
                exit_module.mlp.down_proj.weight.mul_(damping)
            if not model.config.tie_exit_heads:
                model.exit_lm_heads[index].weight.copy_(model.lm_head.weight)
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, EarlyExitGPTForCausalLM]:
    return {name: agreeing_model(**overrides) for name, overrides in CONFIGS.items()}


def speculative(model, ids, mask=None, **kwargs):
    settings = dict(early_exit_mode="speculative", return_dict_in_generate=True, pad_token_id=0)
    return model.generate(ids, attention_mask=mask, **{**settings, **kwargs})


# ------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("regime", ["often", "rarely"])
def test_greedy_batch_equals_full_depth(models, config_name, regime):
    """Left-padded batch of mixed lengths: every row equals full-depth greedy, whatever each row accepts."""
    model = models[config_name]
    threshold = regime_threshold(model, regime)
    ids, mask = left_pad(prompts(lengths=(5, 9, 3, 7)))
    full = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    accepted_per_row = set()  # distinct per-row exit patterns of each run
    for k, stop in ((1, True), (4, True), (3, False)):
        out = speculative(model, ids, mask, max_new_tokens=14, early_exit_threshold=threshold,
                          num_speculative_tokens=k, stop_draft_when_unsure=stop)
        assert torch.equal(out.sequences, full), (k, stop)
        stats = out.early_exit_stats
        assert stats.num_tokens == full[:, ids.shape[1]:].numel()
        assert (out.exit_layers >= 0).all()
        if regime == "often":
            assert stats.draft_tokens > 0 and 0 < stats.accepted_draft_tokens < stats.draft_tokens
            accepted_per_row.add(len({tuple(row) for row in out.exit_layers.tolist()}))
    if regime == "often":  # rows accepted different numbers of drafts in some round
        assert max(accepted_per_row) > 1


@pytest.mark.parametrize(("gate_before_mlp", "measure"), [(False, "gate"), (True, "gate"), (True, "gate_max_prob")],
                         ids=["gate_reads_output", "gate_before_mlp", "gate_screens_max_prob_decides"])
def test_greedy_with_gates_equals_full_depth(gate_before_mlp, measure):
    """Gates decide which tokens are drafted (`"gate"`: read before the exit's MLP and head, or after them;
    `"gate_max_prob"`: the gate screens, the largest probability decides), from exits pruned to a shortlist: every
    row still equals full-depth greedy, drafts are accepted and rejected."""
    model = agreeing_model(seed=2, exit_gate=True, exit_mlp=True, exit_gate_before_mlp=gate_before_mlp,
                           tie_exit_heads=True, exit_vocab=list(range(0, VOCAB, 2)))
    with torch.no_grad():
        for exit_module in model.model.exits:  # gate probabilities spread over (0, 1)
            exit_module.gate.weight.mul_(30.0)
    threshold = gate_threshold(model)
    settings = dict(early_exit_threshold=threshold, exit_confidence=measure)
    if measure == "gate_max_prob":  # the gate screens at the same threshold; the largest probability then decides
        settings.update(exit_gate_threshold=threshold, early_exit_threshold=regime_threshold(model, "mix"))
    ids, mask = left_pad(prompts(lengths=(6, 3, 8), seed=4))
    full = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for k, stop in ((2, True), (4, False)):
        out = speculative(model, ids, mask, max_new_tokens=16, num_speculative_tokens=k, stop_draft_when_unsure=stop,
                          **settings)
        assert torch.equal(out.sequences, full), (k, stop)
        stats = out.early_exit_stats
        assert 0 < stats.accepted_draft_tokens < stats.draft_tokens, (k, stop)
        if stop:  # unsure tokens end the draft, so the exits' heads ran only for tokens their gates let out
            assert stats.exit_head_tokens[0] < stats.exit_gate_tokens[0]


def test_greedy_threshold_extremes_and_budget(models):
    """Threshold 0 drafts every token at the first exit (LayerSkip-like); at 1.0 the deepest exit drafts, or
    nothing is drafted when drafts stop at unsure tokens; 1 to 3 new tokens and more."""
    model = models["plain"]
    prompt = prompts(lengths=(6,))[0]
    for new_tokens in (1, 2, 3, 17):
        full = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        for threshold in (0.0, 1.0):
            out = speculative(model, prompt, max_new_tokens=new_tokens, early_exit_threshold=threshold,
                              num_speculative_tokens=5)
            assert torch.equal(out.sequences, full), (new_tokens, threshold)
    out = speculative(model, prompt, max_new_tokens=17, early_exit_threshold=0.0, num_speculative_tokens=5)
    drafted = out.exit_layers[out.exit_layers < model.config.num_hidden_layers]
    assert drafted.numel() > 0 and (drafted == model.config.exit_layers[0]).all()
    never = speculative(model, prompt, max_new_tokens=17, early_exit_threshold=1.0, stop_draft_when_unsure=True)
    assert never.early_exit_stats.draft_tokens == 0
    deepest = speculative(model, prompt, max_new_tokens=17, early_exit_threshold=1.0)  # unsure: deepest exit drafts
    drafted = deepest.exit_layers[deepest.exit_layers < model.config.num_hidden_layers]
    assert drafted.numel() > 0 and (drafted == model.config.exit_layers[-1]).all()


def test_greedy_eos_pad_and_active_exits():
    """Rows stop at their own end-of-sequence token and are padded, as in transformers' greedy decoding."""
    model = agreeing_model(seed=3, eos_token_id=7)
    threshold = regime_threshold(model, "often")
    ids, mask = left_pad(prompts(lengths=(4, 8, 6, 5, 3, 9), seed=5))
    full = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=[7, 11])
    ended = [(row[ids.shape[1]:] == 0).any().item() for row in full]
    for active in ([2], [4], [2, 4]):
        out = speculative(model, ids, mask, max_new_tokens=20, early_exit_threshold=threshold,
                          active_exits=active, eos_token_id=[7, 11], num_speculative_tokens=3)
        assert torch.equal(out.sequences, full), active
        layers = set(out.exit_layers.flatten().tolist()) - {-1, model.config.num_hidden_layers}
        assert layers <= set(active)
    assert any(ended), "the test needs rows that stop early"


def test_logits_processors_see_each_row_alone():
    """Prefix-dependent processors give full depth's tokens: a minimum length (batched, rows at different lengths)
    and a repetition penalty (one sequence; batched, its per-row padding state is refused with a clear error)."""
    model = agreeing_model(seed=3, eos_token_id=7)
    threshold = regime_threshold(model, "often")
    ids, mask = left_pad(prompts(lengths=(4, 8, 6, 5, 3, 9), seed=5))
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=[7, 11], min_new_tokens=6)
    full = model.generate(ids, attention_mask=mask, **settings)
    out = speculative(model, ids, mask, early_exit_threshold=threshold, **settings)
    assert torch.equal(out.sequences, full)
    assert out.early_exit_stats.accepted_draft_tokens > 0
    prompt = ids[1:2]
    full = model.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
    out = speculative(model, prompt, max_new_tokens=12, early_exit_threshold=threshold, repetition_penalty=1.5)
    assert torch.equal(out.sequences, full)
    with pytest.raises(NotImplementedError, match="RepetitionPenaltyLogitsProcessor"):
        speculative(model, ids, mask, max_new_tokens=4, early_exit_threshold=threshold, repetition_penalty=1.5)


def test_settings_from_generation_config(tmp_path, models):
    model = models["tied_heads"]
    threshold = regime_threshold(model, "often")
    prompt = prompts(lengths=(5,))[0]
    config = GenerationConfig(early_exit_threshold=threshold, early_exit_mode="speculative",
                              num_speculative_tokens=2, pad_token_id=0, do_sample=False)
    config.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    out = model.generate(prompt, generation_config=loaded, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=10, do_sample=False))
    assert out.early_exit_stats.draft_tokens > 0
    assert out.early_exit_stats.rounds * 2 >= out.early_exit_stats.draft_tokens


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"early_exit_mode": "fast"}, "early_exit_mode"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"stop_draft_when_unsure": "yes"}, "stop_draft_when_unsure"),
    ({"early_exit_threshold": None}, "needs `early_exit_threshold`"),
    ({"active_exits": []}, "no exit is active"),
])
def test_bad_settings(models, kwargs, message):
    prompt = prompts(lengths=(4,))[0]
    settings = {"early_exit_mode": "speculative", "early_exit_threshold": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        models["plain"].generate(prompt, max_new_tokens=3, **settings)


def test_unsupported_requests(models):
    prompt = prompts(lengths=(4,))[0]
    settings = {"early_exit_mode": "speculative", "early_exit_threshold": 0.5, "max_new_tokens": 3}
    with pytest.raises(NotImplementedError, match="scores"):
        models["plain"].generate(prompt, return_dict_in_generate=True, output_scores=True, **settings)
    with pytest.raises(NotImplementedError, match="beam"):
        models["plain"].generate(prompt, num_beams=2, **settings)


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def exact_distributions(model, prompt, steps: int, temperature: float) -> list[torch.Tensor]:
    """Full-depth marginal distribution of each of the first `steps` sampled tokens, by enumeration."""
    prefixes, weights = prompt, torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        logits = model(input_ids=prefixes, compute_exits=False).logits[:, -1] / temperature
        probs = logits.double().softmax(-1) * weights[:, None]  # joint of (prefix, next token)
        marginals.append(probs.sum(0))
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0),
                              torch.arange(VOCAB).repeat(prefixes.shape[0])[:, None]], dim=1)
        weights = probs.flatten()
    return marginals


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic, cells with expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def chi_square_quantile(level: float, dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (within 1% for these degrees of freedom)."""
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(level)).item()
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_sampling_distribution_equals_full_depth():
    """Speculative rejection sampling: the first tokens' marginals match full depth's (chi-square, fixed seeds),
    while the same test rejects lossy early exit's drafts at that threshold (the test has power)."""
    model = agreeing_model(seed=1, damping=1.0)
    threshold = regime_threshold(model, "often")
    prompt = prompts(lengths=(4,), seed=2)[0]
    steps, samples, temperature = 3, 2000, 1.0
    exact = exact_distributions(model, prompt, steps, temperature)
    batch = prompt.repeat(samples, 1)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=steps,
                    early_exit_threshold=threshold)
    torch.manual_seed(0)
    out = speculative(model, batch, num_speculative_tokens=2, **sampling)
    stats = out.early_exit_stats
    assert 0.2 < stats.acceptance_rate < 0.99, stats.acceptance_rate
    torch.manual_seed(0)
    lossy = model.generate(batch, pad_token_id=0, **sampling)
    for step in range(steps):
        column = prompt.shape[1] + step
        cells = int((exact[step] * samples >= 5).sum().item()) + 1
        critical = chi_square_quantile(1 - 1e-3, cells - 1)
        spec_counts = torch.bincount(out.sequences[:, column], minlength=VOCAB).double()
        lossy_counts = torch.bincount(lossy[:, column], minlength=VOCAB).double()
        assert chi_square(spec_counts, exact[step]) < critical, step
        assert chi_square(lossy_counts, exact[step]) > 2 * critical, step


def test_streamer_and_custom_stopping_criteria(models):
    """A streamer gets full depth's tokens; a custom criterion (no EOS) stops the batch where full depth does."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            pass

    class TokenSeen(StoppingCriteria):  # a row is done once it generated token 7 (each row does, at its own step)
        def __init__(self, prompt_length):
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, self.prompt_length:] == 7).any(dim=1)

    model = models["plain"]
    threshold = regime_threshold(model, "often")
    prompt = prompts(lengths=(6,))[0]
    full_stream, spec_stream = Recorder(), Recorder()
    full = model.generate(prompt, max_new_tokens=10, do_sample=False, streamer=full_stream)
    out = speculative(model, prompt, max_new_tokens=10, early_exit_threshold=threshold, streamer=spec_stream)
    assert torch.equal(out.sequences, full) and spec_stream.tokens == full_stream.tokens

    ids, mask = left_pad(prompts(lengths=(5, 9, 3, 7), seed=8))
    stop = TokenSeen(ids.shape[1])
    criteria = dict(stopping_criteria=StoppingCriteriaList([stop]), max_new_tokens=30, pad_token_id=0)
    full = model.generate(ids, attention_mask=mask, do_sample=False, **criteria)
    assert full.shape[1] < ids.shape[1] + 30, "the criterion should stop the batch early"
    out = speculative(model, ids, mask, early_exit_threshold=threshold, **criteria)
    assert torch.equal(out.sequences, full)
