"""The teacher-forced cost model of `eellm_hf.eval.exit_agreement` against a hand count: which parts of an exit
each token pays for under each confidence measure."""

from __future__ import annotations

import pytest
import torch

from eellm_hf import EarlyExitGPTConfig
from eellm_hf.eval.exit_agreement import layer_cost, policy

# 4 layers, one exit after layer 2; four tokens, the gate fires on tokens 0 and 2 (which agree with the final head).
DATA = {"final": torch.tensor([1, 2, 3, 4]), "top": torch.tensor([[1, 0, 3, 0]]),
        "gate": torch.tensor([[0.9, 0.1, 0.8, 0.2]]), "max_prob": torch.tensor([[0.9, 0.1, 0.8, 0.2]])}


def config(**options) -> EarlyExitGPTConfig:
    return EarlyExitGPTConfig(num_hidden_layers=4, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                              vocab_size=32, exit_layers=[2], exit_mlp=True, exit_gate=True, **options)


@pytest.mark.parametrize(("measure", "before_mlp"), [("gate", True), ("gate", False), ("max_prob", True)])
def test_cost_model_counts_what_each_token_runs(measure, before_mlp):
    cfg = config(exit_gate_before_mlp=before_mlp)
    layer, mlp, head = layer_cost(cfg), 3 * 8 * 16, 8 * 32
    assert layer == 2 * 8 * 8 + 2 * 8 * 8 + mlp  # q, o, k, v (2 heads of 4, as many kv heads) and the SwiGLU MLP
    leaving = 2 * layer + mlp + head  # tokens 0 and 2: layers 1-2, the exit's MLP and projection
    exit_checked = mlp if measure == "max_prob" or not before_mlp else 0
    exit_checked += head if measure == "max_prob" else 0  # max_prob needs the exit's logits to decide
    staying = 4 * layer + exit_checked + head  # tokens 1 and 3: every layer, what the failed check ran, final head
    row = policy(DATA, measure, 0.5, cfg)
    assert row["shares"] == [0.5] and row["agreement"] == 1.0
    assert row["ideal_speedup"] == pytest.approx((4 * layer + head) / ((2 * leaving + 2 * staying) / 4), rel=1e-6)


@pytest.mark.parametrize("measure", ["gate", "max_prob"])
def test_a_shortlisted_exit_pays_for_its_shortlist_rows_only(measure):
    cfg = config(exit_gate_before_mlp=True, exit_vocab=[0, 1, 3, 5, 7, 11, 13, 17])  # 8 of 32 tokens
    layer, mlp, head, exit_head = layer_cost(cfg), 3 * 8 * 16, 8 * 32, 8 * 8
    leaving = 2 * layer + mlp + exit_head
    exit_checked = (mlp + exit_head) if measure == "max_prob" else 0
    staying = 4 * layer + exit_checked + head
    row = policy(DATA, measure, 0.5, cfg)
    assert row["ideal_speedup"] == pytest.approx((4 * layer + head) / ((2 * leaving + 2 * staying) / 4), rel=1e-6)


def test_gate_max_prob_pays_the_projection_for_screened_in_tokens():
    """The gate screens at 0.15 (tokens 0, 2, 3), the largest probability decides at 0.5 (tokens 0, 2 leave):
    token 3 pays the exit's MLP and projection and goes on; token 1 pays neither."""
    cfg = config(exit_gate_before_mlp=True)
    layer, mlp, head = layer_cost(cfg), 3 * 8 * 16, 8 * 32
    leaving = 2 * layer + mlp + head
    screened_in = 4 * layer + mlp + head + head
    screened_out = 4 * layer + head
    row = policy(DATA, "gate_max_prob", 0.5, cfg, gate_threshold=0.15)
    assert row["shares"] == [0.5] and row["agreement"] == 1.0 and row["gate_threshold"] == 0.15
    expected = (4 * layer + head) / ((2 * leaving + screened_in + screened_out) / 4)
    assert row["ideal_speedup"] == pytest.approx(expected, rel=1e-6)
