"""EE-LLM's exit schedules in the trainer (``train.defer_exit_forward``, ``train.fill_bubbles``) on real gloo
process groups.

One 4-process launch builds trainers for two small models under several layouts (pp=4, pp=2 x dp=2, the
all-forward-all-backward engine, tp=2 x pp=2) and, per layout, the plain schedule, deferred exits, bubble filling
(2 exit-only micro-batches per DP rank) and both (at pp=4); it writes every rank's gradients after one step's
backward (TP shards compared shard by shard), the peak activation bytes autograd held on each stage, and one
training step's losses. Here (pytest side):

* deferred exits: every gradient equals the plain schedule's (1e-6), and stages before the last hold fewer
  activation bytes (the exits' activations are gone between forward and backward);
* bubble filling: every backbone gradient, and every parameter outside the exits, equals the plain schedule's
  (1e-6); an exit's gradient minus the plain one equals the gradient of its loss on the exit-only sequences
  (the single-process HF model, per token as a main token) for the exits before the last stage, and is zero for
  exits on the last stage (which exits take part depends on the layout: exit 3 of the tied case joins at pp=4,
  not at pp=2); the main loss is unchanged and the reported exit-only losses are the HF model's.

This file is also the worker script (``python tests/test_exit_schedule.py OUT SPEC``).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

try:
    from tests.dist_utils import REPO_ROOT, launch
except ImportError:  # tests/ is not a package here
    from dist_utils import REPO_ROOT, launch

GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH, BUBBLES = 8, 8, 1, 2
BASE_MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
BASE_TRAIN = dict(steps=2, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, lr=1e-3, seed=0)
CASES = {
    # exits after layers 1 and 2 (stage 0 at pp=2, stages 0 and 1 at pp=4), exit MLPs, untied heads
    "untied": dict(model=dict(vocab_size=64, exit_layers=[1, 2], exit_loss_weights=[0.5, 0.8], exit_mlp=True),
                   layouts=[dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1]), dict(tp=1, pp=2, dp=2),
                            dict(tp=1, pp=2, dp=2, pp_engine="afab"), dict(tp=2, pp=2, dp=1)]),
    # exit heads tied to the final head and the embedding (backbone parameters: no exit-only gradient); exit 3
    # sits on the last stage at pp=2 (no exit-only micro-batches reach it) but not at pp=4
    "tied": dict(model=dict(vocab_size=61, exit_layers=[1, 3], exit_loss_weights=[0.3, 0.6], tie_exit_heads=True,
                            tie_word_embeddings=True),
                 layouts=[dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1]), dict(tp=1, pp=2, dp=2)]),
}
VARIANTS = {"plain": {}, "defer": dict(defer_exit_forward=True),
            "fill": dict(fill_bubbles=True, bubble_micro_batches=BUBBLES),
            "both": dict(defer_exit_forward=True, fill_bubbles=True, bubble_micro_batches=BUBBLES)}


def _variants(layout: dict) -> list[str]:
    if layout.get("pp_engine") == "afab":
        return ["plain", "defer"]
    return list(VARIANTS) if layout["pp"] == 4 else ["plain", "defer", "fill"]


def _layout_name(layout: dict) -> str:
    return f"tp{layout['tp']}_pp{layout['pp']}_dp{layout['dp']}_{layout.get('pp_engine', '1f1b')}"


# ------------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------------


def _worker(out_dir: str, spec_path: str) -> None:
    package = types.ModuleType("eellm_hf")  # skip eellm_hf/__init__ (transformers): torch and nanotron only
    package.__path__ = [str(REPO_ROOT / "eellm_hf")]
    sys.modules.setdefault("eellm_hf", package)
    import torch

    from eellm_hf.trainer import nanotron_compat as c
    from eellm_hf.trainer.config import TrainConfig
    from eellm_hf.trainer.exit_schedule import SavedActivationMeter
    from eellm_hf.trainer.rank_exit import fail_fast
    from eellm_hf.trainer.train_loop import ParallelTrainer

    spec = torch.load(spec_path)
    ids, labels = spec["batch"]
    torch.set_num_threads(1)
    with fail_fast():
        for case_name, case in CASES.items():
            config = types.SimpleNamespace(**spec["configs"][case_name])
            for layout in case["layouts"]:
                ctx = c.make_parallel_context(layout["tp"], layout["pp"], layout["dp"], timeout_s=120)
                for variant in _variants(layout):
                    train = TrainConfig(**BASE_TRAIN, **VARIANTS[variant])
                    trainer = ParallelTrainer(config, ctx, train, layer_split=layout.get("layer_split"),
                                              pp_engine=layout.get("pp_engine", "1f1b"))
                    bubble = {k: v[: trainer.bubble_batch_size] for k, v in spec["bubble"].items()}
                    params = list(trainer.model.parameters())
                    with SavedActivationMeter(exclude=params) as meter:
                        trainer.compute_gradients(0, ids, labels, bubble=bubble)
                    grads = {(name, ctx.tp_rank): p.grad.detach().clone()  # TP shards: compared shard by shard
                             for name, p in trainer.model.hf_named_parameters().items() if p.grad is not None}
                    trainer.optimizer.zero_grad()
                    result = trainer.train_step(0, ids, labels, bubble=bubble)
                    name = f"{case_name}__{_layout_name(layout)}__{variant}"
                    record = {"grads": grads, "peak": meter.peak, "loss": result.loss,
                              "exit_losses": result.exit_losses, "bubble_losses": result.bubble_exit_losses,
                              "bubble_rows": trainer.bubble_batch_size, "bubble_tokens": result.bubble_label_tokens}
                    if ctx.dp_rank == 0:
                        torch.save(record, Path(out_dir) / f"{name}__pp{ctx.pp_rank}_tp{ctx.tp_rank}.pt")
                    torch.distributed.barrier()
        print("WORKER DONE", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Pytest side
# ------------------------------------------------------------------------------------------------------------


def _config(case: str):
    from eellm_hf.modeling import EarlyExitGPTConfig

    return EarlyExitGPTConfig(**{**BASE_MODEL, **CASES[case]["model"]})


def _data():
    import torch

    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 61, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    labels = torch.randint(0, 61, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    labels[2, :3] = -100
    rows = BUBBLES * 2 * MICRO_BATCH  # the most any layout takes (dp=2)
    bubble = {"input_ids": torch.randint(0, 61, (rows, SEQ_LEN), generator=g),
              "labels": torch.randint(0, 61, (rows, SEQ_LEN), generator=g)}
    bubble["labels"][1, -2:] = -100
    return (ids, labels), bubble


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import torch

    tmp = tmp_path_factory.mktemp("exit_schedule")
    batch, bubble = _data()
    spec = tmp / "spec.pt"
    torch.save({"configs": {name: _config(name).to_dict() for name in CASES}, "batch": batch, "bubble": bubble}, spec)
    launch(Path(__file__), 4, [str(tmp), str(spec)], timeout_s=300)
    return tmp


def _load(runs: Path, case: str, layout: dict, variant: str) -> list[dict]:
    """Per pipeline stage (TP rank 0 first, then the others after all stages), what the worker recorded."""
    import torch

    name = f"{case}__{_layout_name(layout)}__{variant}"
    return [torch.load(runs / f"{name}__pp{stage}_tp{tp}.pt") for tp in range(layout["tp"])
            for stage in range(layout["pp"])]


def _grads(records: list[dict]) -> dict:
    merged = {}
    for record in records:
        merged.update(record["grads"])
    return merged


def _rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _bubble_reference(case: str, rows: int, reached: list[int]):
    """The single-process HF model: gradients of exit parameters (tied heads excluded) and per-exit token means
    of the exits in ``reached`` on the first ``rows`` exit-only sequences, each token weighted as a main token."""
    import torch
    import torch.nn.functional as F

    from eellm_hf.modeling import EarlyExitGPTForCausalLM
    from eellm_hf.trainer.weights import init_hf_state_dict

    config = _config(case)
    model = EarlyExitGPTForCausalLM(config)
    model.load_state_dict(init_hf_state_dict(config, BASE_TRAIN["seed"]))
    (_, labels), bubble = _data()
    ids, bubble_labels = bubble["input_ids"][:rows], bubble["labels"][:rows]
    out = model(input_ids=ids)
    main_tokens = int((labels != -100).sum())
    sums = [F.cross_entropy(x.reshape(-1, config.vocab_size), bubble_labels.reshape(-1), ignore_index=-100,
                            reduction="sum") for x in out.exit_logits]
    loss = sum(config.exit_loss_weights[j] * sums[j] for j in reached) / main_tokens
    tied = config.tie_exit_heads
    names = [n for n, _ in model.named_parameters()
             if n.startswith("model.exits.") or (n.startswith("exit_lm_heads.") and not tied)]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    tokens = int((bubble_labels != -100).sum())
    return ({n: g for n, g in zip(names, grads) if g is not None},
            [float(sums[j].detach()) / tokens if j in reached else None for j in range(len(sums))])


def _exit_stage(case: str, layout: dict, exit_index: int) -> int:
    from eellm_hf.trainer.parallel_model import make_layout

    config = _config(case)
    return make_layout(config, layout["pp"], layout.get("layer_split")).stage_of_exit(exit_index)


@pytest.mark.parametrize("case", list(CASES))
def test_deferred_exits_keep_every_gradient_and_hold_less(runs, case):
    for layout in CASES[case]["layouts"]:
        plain, deferred = _load(runs, case, layout, "plain"), _load(runs, case, layout, "defer")
        where = f"{case} {_layout_name(layout)}"
        assert deferred[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6), where
        assert _rel(deferred[0]["exit_losses"], plain[0]["exit_losses"]) < 1e-6, where
        base, got = _grads(plain), _grads(deferred)
        assert set(got) == set(base), where
        for name, grad in base.items():
            assert _rel(got[name], grad) < 1e-6, f"{where}: {name}"
        exit_stages = {_exit_stage(case, layout, j) for j in range(len(CASES[case]["model"]["exit_layers"]))}
        for stage in exit_stages - {layout["pp"] - 1}:  # stages with exits before the last hold less
            assert deferred[stage]["peak"] < plain[stage]["peak"], f"{where} stage {stage}"


@pytest.mark.parametrize("case", list(CASES))
def test_bubble_micro_batches_train_only_the_exits(runs, case):
    config = _config(case)
    for layout in CASES[case]["layouts"]:
        plain = _load(runs, case, layout, "plain")
        for variant in [v for v in _variants(layout) if "bubble_micro_batches" in VARIANTS[v]]:
            filled = _load(runs, case, layout, variant)
            where = f"{case} {_layout_name(layout)} {variant}"
            rows = filled[0]["bubble_rows"]
            assert rows == BUBBLES * layout["dp"] * MICRO_BATCH, where
            reached = [j for j in range(len(config.exit_layers)) if _exit_stage(case, layout, j) < layout["pp"] - 1]
            ref_grads, ref_losses = _bubble_reference(case, rows, reached)
            assert filled[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6), where  # main losses unchanged
            assert _rel(filled[0]["exit_losses"], plain[0]["exit_losses"]) < 1e-6, where
            for got, ref in zip(filled[0]["bubble_losses"], ref_losses, strict=True):
                assert (got is None) == (ref is None), where
                assert ref is None or got == pytest.approx(ref, rel=1e-5), where
            base, got = _grads(plain), _grads(filled)
            assert set(got) == set(base), where
            for (name, tp_rank), grad in base.items():
                extra = got[name, tp_rank] - grad
                if name in ref_grads and ref_grads[name].abs().max() > 0:
                    if layout["tp"] == 1:  # (with TP, a shard of the HF model's gradient)
                        assert _rel(extra, ref_grads[name]) < 1e-5, f"{where}: {name}"
                    assert extra.abs().max() > 0, f"{where}: {name} tp rank {tp_rank}"
                else:  # the backbone, tied heads, exits on the last stage: the main micro-batches' gradient
                    assert _rel(got[name, tp_rank], grad) < 1e-6, f"{where}: {name} received an exit-only gradient"
            trained = {n for n in ref_grads if any(name == n for name, _ in got)}
            assert trained and all(n.startswith(("model.exits.", "exit_lm_heads.")) for n in trained), where


def test_config_checks_name_the_bad_value():
    from eellm_hf.trainer.config import TrainConfig

    with pytest.raises(ValueError, match="freeze_backbone"):
        TrainConfig(**BASE_TRAIN, defer_exit_forward=True, freeze_backbone=True)
    with pytest.raises(ValueError, match="bfloat16"):
        TrainConfig(**BASE_TRAIN, fill_bubbles=True, dtype="bfloat16")
    with pytest.raises(ValueError, match="bubble_micro_batches`=2 needs `train.fill_bubbles"):
        TrainConfig(**BASE_TRAIN, bubble_micro_batches=2)
    with pytest.raises(ValueError, match="got 0"):
        TrainConfig(**BASE_TRAIN, fill_bubbles=True, bubble_micro_batches=0)
    with pytest.raises(ValueError, match="got 'yes'"):
        TrainConfig(**BASE_TRAIN, defer_exit_forward="yes")


@pytest.mark.parametrize("parallelism, train, message", [
    (dict(pp=1), dict(defer_exit_forward=True), "needs pipeline parallelism .* got pp=1"),
    (dict(pp=2, pp_engine="afab"), dict(fill_bubbles=True), r"1f1b` \(its bubbles\), got 'afab'"),
    (dict(pp=2, layer_split=[1, 3]), dict(fill_bubbles=True), r"every exit \(layers \[2, 3\]\) is on the last"),
])
def test_layout_checks_name_the_bad_value(tmp_path, parallelism, train, message):
    from eellm_hf.trainer.config import load_config

    raw = {"model": {**BASE_MODEL, "vocab_size": 64, "exit_layers": [2, 3]}, "parallelism": parallelism,
           "data": {"files": ["x.txt"], "tokenizer": str(tmp_path), "seq_len": 8},
           "train": {**BASE_TRAIN, **train}, "run_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=message):
        load_config(raw, check_files=False)


def test_cli_run_with_both_options_logs_the_exit_only_losses(tmp_path):
    """`python -m eellm_hf.trainer` at pp=2 with both options: exit-only sequences drawn every step, their
    losses logged next to the main ones, and the main batches those of a run without the options."""
    import math

    import yaml

    try:
        from tests.test_trainer_parallel import _e2e_config
    except ImportError:
        from test_trainer_parallel import _e2e_config
    from eellm_hf.trainer.data import bible_chapters
    from eellm_hf.trainer.metrics import read_metrics

    (tmp_path / "kjv.txt").write_text("\n\n".join(bible_chapters()[:10]) + "\n", encoding="utf-8")
    cfg = _e2e_config(tmp_path)
    for key in ("checkpoint", "export_hf"):
        cfg.pop(key)
    cfg["data"].pop("validation_sequences")
    cfg["train"] = {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-2,
                    "defer_exit_forward": True, "fill_bubbles": True, "bubble_micro_batches": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    launch(REPO_ROOT / "eellm_hf" / "trainer" / "__main__.py", 2, ["--config", str(tmp_path / "cfg.yaml")],
           timeout_s=240)
    train = read_metrics(cfg["run_dir"], split="train")
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    for entry in train:
        assert entry["bubble_label_tokens"] == 2 * 32  # one micro-batch of 2 sequences of 32 labels
        (loss,) = entry["bubble_exit_losses"]  # the exit after layer 1, on stage 0
        assert math.isfinite(loss) and 0 < loss < 2 * math.log(384)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1], sys.argv[2])
