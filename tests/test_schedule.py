"""The analytic schedule model: closed forms of 1F1B, its options, pipeline decoding, the CLI."""

from __future__ import annotations

import json

import pytest

from eellm_hf.trainer.schedule import (
    StageTimes,
    ee_llm_table,
    main,
    max_bubble_microbatches,
    one_f_one_b_order,
    simulate_1f1b,
    simulate_pipeline_decoding,
)


@pytest.mark.parametrize("pp, microbatches", [(1, 3), (2, 1), (2, 4), (4, 8), (4, 2), (3, 16)])
def test_uniform_stages_match_the_closed_form(pp, microbatches):
    f, b = 1.0, 2.0
    result = simulate_1f1b([StageTimes(f, b)] * pp, microbatches)
    assert result.pipeline_time == pytest.approx((microbatches + pp - 1) * (f + b))
    assert result.bubble_fraction == pytest.approx((pp - 1) / (microbatches + pp - 1))


def test_one_f_one_b_order_is_nanotrons():
    assert one_f_one_b_order(0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2),
                                          ("B", 3)]
    assert one_f_one_b_order(2, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert one_f_one_b_order(0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_p2p_optimizer_and_the_slowest_stage():
    # One micro-batch crosses every hop twice; the optimizer step follows the pipeline.
    result = simulate_1f1b([StageTimes(1.0, 2.0, optimizer=0.5), StageTimes(1.0, 2.0, optimizer=0.25)] * 2, 1,
                           p2p=0.1)
    assert result.pipeline_time == pytest.approx(4 * 3.0 + 2 * 3 * 0.1)
    assert result.iteration_time == pytest.approx(result.pipeline_time + 0.5)
    # Many micro-batches: the slowest stage (with its exit) sets the pace.
    stages = [StageTimes(1.0, 2.0, exit_forward=0.5, exit_backward=1.0), StageTimes(1.0, 2.0)]
    slow = simulate_1f1b(stages, 64).pipeline_time
    assert 64 * 4.5 < slow < 64 * 4.5 + 2 * 4.5


def test_defer_exit_forward_moves_work_not_time_totals():
    stages = [StageTimes(1.0, 2.0, 0.5, 1.0), StageTimes(1.0, 2.0, 0.5, 1.0), StageTimes(1.0, 2.0, head_forward=0.5,
                                                                                          head_backward=1.0)]
    plain = simulate_1f1b(stages, 6)
    deferred = simulate_1f1b(stages, 6, defer_exit_forward=True)
    assert sum(plain.busy) == pytest.approx(sum(deferred.busy))
    assert deferred.pipeline_time == pytest.approx(plain.pipeline_time, rel=0.1)
    # On the last stage nothing changes: exits there keep their forward in the forward step.
    last_only = [StageTimes(1.0, 2.0), StageTimes(1.0, 2.0, 0.5, 1.0)]
    assert simulate_1f1b(last_only, 4, defer_exit_forward=True) == simulate_1f1b(last_only, 4)


def test_fill_bubbles_places_exit_micro_batches_before_the_first_backward():
    # pp=2, exit on stage 0 (forward 1 + 0.1, backward 2 + 0.2): stage 0 waits 1.9 for its first gradient (from 2.2
    # to 4.1); one exit-only micro-batch (no-grad backbone 1, exits 0.3) fits there, a second delays stage 1.
    stages = [StageTimes(1.0, 2.0, 0.1, 0.2), StageTimes(1.0, 2.0)]
    plain = simulate_1f1b(stages, 4)
    assert one_f_one_b_order(0, 2, 4, 1) == [("F", 0), ("F", 1), ("X", 0), ("E", 0), ("B", 0), ("F", 2), ("B", 1),
                                             ("F", 3), ("B", 2), ("B", 3)]
    filled = simulate_1f1b(stages, 4, fill_bubbles=True)
    assert filled.extra_exit_microbatches == max_bubble_microbatches(stages, 4) == 1
    assert filled.pipeline_time == pytest.approx(plain.pipeline_time)
    assert filled.busy[0] == pytest.approx(plain.busy[0] + 1.3) and filled.busy[1] == plain.busy[1]
    assert simulate_1f1b(stages, 4, bubble_microbatches=2).pipeline_time > plain.pipeline_time + 0.5
    # Deeper pipelines: more room on the first stages; never an exit-only micro-batch without an exit before
    # the last stage.
    deep = [StageTimes(1.0, 2.0, 0.1, 0.2), StageTimes(1.0, 2.0, 0.1, 0.2), StageTimes(1.0, 2.0),
            StageTimes(1.0, 2.0)]
    deep_filled = simulate_1f1b(deep, 8, fill_bubbles=True)
    assert deep_filled.extra_exit_microbatches == 2
    assert deep_filled.iteration_time == pytest.approx(simulate_1f1b(deep, 8).iteration_time)
    assert simulate_1f1b([StageTimes(1.0, 2.0)] * 2, 4, fill_bubbles=True).extra_exit_microbatches == 0
    last_only = [StageTimes(1.0, 2.0), StageTimes(1.0, 2.0, 0.1, 0.2)]
    assert simulate_1f1b(last_only, 4, bubble_microbatches=3) == simulate_1f1b(last_only, 4)


def test_pipeline_decoding_latency():
    # Every token leaves on stage 0: the next one starts as soon as stage 0 is done; stage 1 fills in parallel.
    assert simulate_pipeline_decoding([[1.0, 1.0]] * 5, [0] * 5) == pytest.approx(5.0)
    # Every token needs the final head: no overlap.
    assert simulate_pipeline_decoding([[1.0, 1.0]] * 5, [1] * 5, p2p=0.1) == pytest.approx(5 * 2.2)
    # Stage 1 slower than stage 0: exited tokens pile up behind it, the next full-depth token waits.
    assert simulate_pipeline_decoding([[1.0, 3.0]] * 3, [0, 0, 1]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="exit stage 2"):
        simulate_pipeline_decoding([[1.0, 1.0]], [2])


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="StageTimes.backward .* -1"):
        StageTimes(1.0, -1)
    with pytest.raises(ValueError, match="microbatches .* 0"):
        simulate_1f1b([StageTimes(1.0, 2.0)], 0)


def test_ee_llm_configurations_and_cli(capsys):
    rows = ee_llm_table((8, 128))
    assert {row["model"] for row in rows} == {"1.3B", "7B", "13B", "30B"}
    for row in rows:
        assert 0.0 <= row["overhead"] < 0.05, row  # exits sit on stages that are lighter than the last
    by_model = {(row["model"], row["microbatches"]): row for row in rows}
    assert by_model[("7B", 128)]["bubble"] < by_model[("7B", 8)]["bubble"]
    assert main(["--pp", "4", "--microbatches", "8", "--forward", "1", "--backward", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iteration_time"] == pytest.approx(33.0)
    assert main(["--ee-llm"]) == 0
    assert "| 30B |" in capsys.readouterr().out


def test_cli_places_exit_only_micro_batches(capsys):
    args = ["--pp", "2", "--microbatches", "4", "--forward", "1", "--backward", "2", "--exit-forward", "0.1", "0",
            "--exit-backward", "0.2", "0", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--fill-bubbles"]) == 0
    filled = json.loads(capsys.readouterr().out)
    assert filled["extra_exit_microbatches"] == 1 and filled["pipeline_time"] == pytest.approx(plain["pipeline_time"])
    assert main([*args, "--bubble-microbatches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["extra_exit_microbatches"] == 2 and result["pipeline_time"] > plain["pipeline_time"] + 0.5


def test_trainer_count_comes_from_the_stages_flops():
    """`bubble_micro_batches: null`: the schedule model on per-stage FLOPs (the trainer's layout); none when every
    exit sits on the last stage."""
    import types

    from eellm_hf.trainer.exit_schedule import bubble_stages_of, predicted_bubble_micro_batches
    from eellm_hf.trainer.parallel_model import make_layout

    config = types.SimpleNamespace(vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=None, exit_layers=[2, 4])
    deep, shallow = make_layout(config, 4, [2, 2, 2, 2]), make_layout(config, 2, [4, 4])
    assert bubble_stages_of(deep) == 2 and bubble_stages_of(shallow) == 1
    assert predicted_bubble_micro_batches(config, deep, 8) == 2
    assert predicted_bubble_micro_batches(config, shallow, 8) == 1
    late = types.SimpleNamespace(**{**vars(config), "exit_layers": [6]})
    last = make_layout(late, 2, [4, 4])
    assert bubble_stages_of(last) == 0 and predicted_bubble_micro_batches(late, last, 8) == 0
