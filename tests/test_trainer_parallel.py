"""The 3D-parallel trainer against single-process training of the HF model, on real gloo process groups.

One 4-process launch trains three small models for 3 steps under several layouts each (tp=2 x pp=2,
pp=2 x dp=2, tp=2 x dp=2, pp=4; 10 runs in all), then writes per-step losses, gradient norms, the gathered HF
state dict and the heads' logits. Here (pytest side) the same models train with plain PyTorch:
``EarlyExitGPTForCausalLM``, same initial weights, same global batches, ``torch.optim.AdamW``; everything must
agree within 1e-5 relative. The same launch then checks every head's logits with eager attention and llama3
rotary scaling (tp=2 x pp=2) against the HF model. Three 2-process launches run the CLI end to end on a little
KJV text: training with validation, checkpoints, HF export and a (generous) time budget; a resume that must keep
the saved total of steps; EE-Tuning from the export under a tiny time budget (the run stops early, all ranks together).

This file is also the worker script (``python tests/test_trainer_parallel.py equivalence SPEC OUT``). Workers
import ``eellm_hf.trainer`` without ``eellm_hf/__init__.py`` (the auto-class registrations): the parallel trainer
needs torch, nanotron and the model's transformers modules only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

try:
    from tests.dist_utils import REPO_ROOT, launch
except ImportError:  # tests/ is not a package here: pytest put tests/ itself on sys.path
    from dist_utils import REPO_ROOT, launch

RTOL = 1e-5
STEPS = 3
GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH = 8, 8, 2

BASE_MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# adam_eps: Adam divides each gradient entry by its own magnitude, so entries of |g| ~ 1e-9 (whose fp32 value
# depends on summation order) would move by ~lr whatever their exact value; eps = 1e-3 keeps the update a smooth
# function of the gradient, so the weights after a few steps compare at 1e-5 like the gradients themselves.
BASE_TRAIN = dict(steps=STEPS, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH, lr=3e-3, seed=0,
                  warmup_steps=1, min_lr=3e-4, weight_decay=0.1, adam_beta2=0.99, adam_eps=1e-3, grad_clip=1.0)

CASES = {
    # vocab 61: padded to 62 under tp=2; embedding, final head and every exit head tied (across stages);
    # exits after layers 1-3, i.e. on middle stages with pp=4; GQA; a pad token in the inputs. Exit weights
    # scheduled from an absolute 0.5 to the targets: exit 1 cools down (0.5 -> 0.3), exit 3 warms up (-> 0.7).
    "tied": dict(
        model=dict(vocab_size=61, exit_layers=[1, 2, 3], exit_loss_weights=[0.3, 0.5, 0.7],
                   tie_word_embeddings=True, tie_exit_heads=True, pad_token_id=3),
        train=dict(exit_temperature=2.0, exit_loss_weight_schedule=dict(init=0.5, warmup_steps=2, type="cosine")),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=2, dp=2), dict(tp=2, pp=1, dp=2),
                 dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1])],
    ),
    # Untied heads with exit blocks and MLPs, biases everywhere (row-parallel biases on TP rank 0), ZeRO-1;
    # LayerSkip's layer dropout (sequences skip layers 2-4 at rates up to 0.6, on both pipeline stages).
    "untied": dict(
        model=dict(vocab_size=64, exit_layers=[2], exit_loss_weights=[0.5], exit_block=True, exit_mlp=True,
                   attention_bias=True, mlp_bias=True),
        train=dict(zero_stage=1, layer_dropout=dict(max_rate=0.6)),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=2, dp=2), dict(tp=2, pp=1, dp=2)],
    ),
    # EE-Tuning: only the exits train; with pp=4 the last stage (after the last exit) is forward-only.
    # Also nanotron's all-forward-all-backward engine, and layer dropout in the frozen backbone. In every
    # EE-Tuning case at pp > 1 the stages before the last start each next step's first micro-batch early
    # (`train.prefetch_next_step`, the default): the worker hands each step the next one's batch.
    "ee_tuning": dict(
        model=dict(vocab_size=64, exit_layers=[1, 3], exit_loss_weights=[1.0, 1.0], exit_mlp=True),
        train=dict(freeze_backbone=True, layer_dropout=dict(max_rate=0.6)),
        layouts=[dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1]), dict(tp=2, pp=2, dp=1),
                 dict(tp=1, pp=2, dp=2, pp_engine="afab")],
    ),
    # EE-Tuning with self-distillation: exit loss = w * KL(final head || exit / T) + (1 - w) * CE. The teacher
    # comes from the last stage to exits on every earlier stage (pp=4), TP-sharded over a padded vocabulary.
    # Confidence gates learn (BCE) whether each exit's greedy token is the final head's, reading the exit's state
    # before its MLP (`exit_gate_before_mlp`; the autocast case below has gates that read the exit's output).
    "distill_tied": dict(
        model=dict(vocab_size=61, exit_layers=[1, 3], exit_loss_weights=[0.5, 1.0], exit_mlp=True,
                   tie_word_embeddings=True, tie_exit_heads=True, exit_gate=True, exit_gate_before_mlp=True),
        train=dict(freeze_backbone=True, exit_distillation=0.6, exit_temperature=1.5),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=2, dp=2), dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1]),
                 dict(tp=2, pp=1, dp=2)],
    ),
    # EE-Tuning under bf16 autocast (fp32 weights, bf16 matmuls, the teacher sent in bf16), against the reference
    # model's forward under the same autocast. Tolerance AUTOCAST_RTOL, not RTOL: a bf16 matmul rounds its output
    # to 8 significant bits, so the micro-batch split (the reference runs the whole batch at once) and the order of
    # the TP sums can move an output by one bf16 step: losses and gradient norms must agree within that step, 2**-8
    # relative (measured: 5e-4). The weights after three Adam steps within 2e-2 of the largest: Adam divides each
    # gradient entry by its own magnitude, and a gate's target (exit and teacher agreeing on the top token) can flip
    # where two bf16 logits tie.
    "distill_autocast": dict(
        model=dict(vocab_size=61, exit_layers=[1, 3], exit_loss_weights=[0.5, 1.0], exit_mlp=True,
                   tie_word_embeddings=True, tie_exit_heads=True, exit_gate=True),
        train=dict(freeze_backbone=True, exit_distillation=0.6, autocast="bfloat16"),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=2, dp=2)],
        rtol=2**-8, state_rtol=2e-2,
    ),
    "distill_untied": dict(
        model=dict(vocab_size=64, exit_layers=[2], exit_loss_weights=[1.0], exit_block=True),
        train=dict(freeze_backbone=True, exit_distillation=1.0),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1])],
    ),
    # Vocabulary-pruned exits (`exit_vocab`, 21 of 61 tokens, on both TP shards of the padded 62): EE-Tuning with
    # gates and distillation against the teacher restricted to the shortlist, which travels as its shortlisted
    # columns and greedy token only; labels off the shortlist cost no CE.
    "shortlist_distill": dict(
        model=dict(vocab_size=61, exit_layers=[1, 3], exit_loss_weights=[0.5, 1.0], exit_mlp=True,
                   tie_word_embeddings=True, tie_exit_heads=True, exit_gate=True, exit_gate_before_mlp=True,
                   exit_vocab=list(range(0, 61, 3))),
        train=dict(freeze_backbone=True, exit_distillation=0.6, exit_temperature=1.5),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=4, dp=1, layer_split=[1, 1, 1, 1]), dict(tp=2, pp=1, dp=2)],
    ),
    # ... and trained with the whole model (nanotron's engine), untied heads: only their shortlisted rows learn.
    "shortlist_ce": dict(
        model=dict(vocab_size=64, exit_layers=[2], exit_loss_weights=[0.5], exit_vocab=[1, 4, 9, 16, 25, 36, 49]),
        train=dict(),
        layouts=[dict(tp=2, pp=2, dp=1), dict(tp=1, pp=2, dp=2)],
    ),
}

# Eager attention and llama3 rotary scaling (every other case runs SDPA and the default rope), in exit blocks too.
ATTENTION_MODEL = dict(
    vocab_size=61, exit_layers=[1, 3], exit_block=True, attn_implementation="eager",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 4})


def _layout_name(layout: dict) -> str:
    return f"tp{layout['tp']}_pp{layout['pp']}_dp{layout['dp']}"


# ------------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------------


def _import_trainer_without_transformers() -> None:
    """Make ``eellm_hf`` a bare namespace so that importing ``eellm_hf.trainer.*`` skips the package
    ``__init__`` (and its transformers auto-class imports)."""
    package = types.ModuleType("eellm_hf")
    package.__path__ = [str(REPO_ROOT / "eellm_hf")]
    sys.modules.setdefault("eellm_hf", package)


def _train_config(spec: dict):
    from eellm_hf.trainer.config import ExitLossWeightSchedule, LayerDropout, TrainConfig

    kwargs = dict(spec)
    schedule = kwargs.pop("exit_loss_weight_schedule", None)
    if schedule is not None:
        kwargs["exit_loss_weight_schedule"] = ExitLossWeightSchedule(**schedule)
    layer_dropout = kwargs.pop("layer_dropout", None)
    if layer_dropout is not None:
        kwargs["layer_dropout"] = LayerDropout(**layer_dropout)
    return TrainConfig(**kwargs)


@contextlib.contextmanager
def _head_logits(model):
    """``{head: [full logits of each call]}`` of the heads on this rank (exits, then the final head) while the block
    runs: a forward pre-hook gives each head's input to its own projection, TP-gathered, vocabulary padding
    removed."""
    import torch

    captured, handles = {}, []

    def capture(head, args, kwargs):
        shard = head.sharded_logits(kwargs["hidden_states"]).contiguous()
        if head.shortlist is not None:  # its shortlisted columns: -inf elsewhere, as the HF model's exit logits
            full = shard.new_full((*shard.shape[:-1], head.weight.shape[0] * head.pg.size()), float("-inf"))
            full[..., head.shortlist.ids] = shard
            torch.distributed.all_reduce(full, op=torch.distributed.ReduceOp.MAX, group=head.pg)
            captured.setdefault(head.head, []).append(full[..., : head.vocab_size].cpu())
            return
        pieces = [torch.empty_like(shard) for _ in range(head.pg.size())]
        torch.distributed.all_gather(pieces, shard, group=head.pg)
        captured.setdefault(head.head, []).append(torch.cat(pieces, dim=-1)[..., : head.vocab_size].cpu())

    for block in [*model.exit_lm_heads, model.lm_head]:
        if hasattr(block, "pp_block"):
            handles.append(block.pp_block.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _worker_equivalence(spec_path: str, out_dir: str) -> None:
    _import_trainer_without_transformers()
    import torch

    from eellm_hf.trainer import nanotron_compat as c
    from eellm_hf.trainer.rank_exit import fail_fast
    from eellm_hf.trainer.train_loop import ParallelTrainer, forward_only
    from eellm_hf.trainer.weights import gather_hf_state_dict

    grad_messages = [0]  # gradients received from a later pipeline stage, counted on every rank

    def count_recv_grad(self, *args, **kwargs):
        grad_messages[0] += 1
        return original_recv_grad(self, *args, **kwargs)

    original_recv_grad = c.PipelineTrainBatchState.register_recv_grad
    c.PipelineTrainBatchState.register_recv_grad = count_recv_grad
    spec = torch.load(spec_path)
    out = Path(out_dir)
    timeout = float(os.environ.get("EE_TEST_TIMEOUT", "120"))
    torch.set_num_threads(1)
    with fail_fast():
        for case_name, case in spec["cases"].items():
            config = types.SimpleNamespace(**case["config"])
            train = _train_config(case["train"])
            for layout in case["layouts"]:
                ctx = c.make_parallel_context(layout["tp"], layout["pp"], layout["dp"], timeout_s=timeout)
                trainer = ParallelTrainer(config, ctx, train, layer_split=layout.get("layer_split"),
                                          pp_engine=layout.get("pp_engine", "1f1b"))
                steps, prefetched = [], 0
                grad_messages[0] = 0
                batches = spec["batches"]
                for step, (ids, labels) in enumerate(batches):
                    following = batches[step + 1] if step + 1 < len(batches) else None
                    r = trainer.train_step(step, ids, labels, next_batch=following and dict(
                        input_ids=following[0], labels=following[1]))
                    prefetched += bool(trainer.frozen_step and trainer.frozen_step.has_prefetched)
                    if os.environ.get("EE_TEST_DEBUG"):
                        print("STEP", case_name, layout, step, r.loss, flush=True)
                    steps.append({"loss": r.loss, "exit_losses": r.exit_losses, "grad_norm": r.grad_norm,
                                  "lr": r.lr, "exit_weights": r.exit_weights, "gate_losses": r.gate_losses})
                # logits of every head on a fixed batch, where each head lives
                trainer.model.eval()
                trainer.model.loss.reset_sums()
                ids, labels = spec["eval_batch"]
                with _head_logits(trainer.model) as calls:
                    forward_only(trainer.model, [{"input_ids": ids, "labels": labels}])
                captured = {head: torch.cat(logits) for head, logits in calls.items()}
                received = torch.tensor(grad_messages[0])
                torch.distributed.all_reduce(received)
                state = gather_hf_state_dict(trainer.model)
                wrong_next = _train_on_another_batch_than_next(trainer, batches) if trainer.prefetches else None
                name = f"{case_name}__{_layout_name(layout)}"
                if ctx.dp_rank == 0 and ctx.tp_rank == 0 and captured:
                    torch.save(captured, out / f"{name}__logits_pp{ctx.pp_rank}.pt")
                if state is not None:
                    torch.save({"steps": steps, "state": state, "grad_messages": int(received),
                                "prefetched_steps": prefetched, "wrong_next": wrong_next}, out / f"{name}.pt")
                torch.distributed.barrier()
        _attention_logits(spec["attention"], out)
        print("WORKER DONE", flush=True)


def _train_on_another_batch_than_next(trainer, batches) -> dict:
    """After the case's steps: a step handed the next batch, then a call with another batch (refused), then that
    batch again (trains: the refusal left the pipeline clean)."""
    (ids, labels), (next_ids, next_labels), (other_ids, other_labels) = batches[:3]
    trainer.train_step(STEPS, ids, labels, next_batch={"input_ids": next_ids, "labels": next_labels})
    try:
        trainer.train_step(STEPS + 1, other_ids, labels)
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"error": error, "then": trainer.train_step(STEPS + 1, other_ids, other_labels).finite}


def _attention_logits(spec: dict, out: Path) -> None:
    """Every head's logits of a freshly initialised model with the config's attention implementation."""
    import torch

    from eellm_hf.trainer import nanotron_compat as c
    from eellm_hf.trainer.train_loop import ParallelTrainer, forward_only

    layout = spec["layout"]
    ctx = c.make_parallel_context(layout["tp"], layout["pp"], layout["dp"], timeout_s=60)
    config = types.SimpleNamespace(**spec["config"], attn_implementation=spec["attn_implementation"])
    trainer = ParallelTrainer(config, ctx, _train_config(BASE_TRAIN))
    trainer.model.eval()
    ids, labels = spec["batch"]
    with _head_logits(trainer.model) as calls:
        forward_only(trainer.model, [{"input_ids": ids, "labels": labels}])
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:
        torch.save({head: torch.cat(logits) for head, logits in calls.items()}, out / f"attention__pp{ctx.pp_rank}.pt")
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------------------
# Pytest side: the single-process reference
# ------------------------------------------------------------------------------------------------------------


def _model_config(case: dict):
    from eellm_hf.modeling import EarlyExitGPTConfig

    return EarlyExitGPTConfig(**{**BASE_MODEL, **case["model"]})


def _batches(vocab_size: int):
    """STEPS global batches plus an evaluation batch; a few ignored labels and pad tokens included."""
    import torch

    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(STEPS + 1):
        ids = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=g)
        labels = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=g)
        ids[0, :2] = 3
        labels[1, :3] = -100
        labels[5, -2:] = -100
        batches.append((ids, labels))
    return batches[:-1], batches[-1]


def _reference_run(config, train, batches: list, freeze: bool):
    """Plain single-process training of EarlyExitGPTForCausalLM: per-step results and final state dict."""
    import torch
    import torch.nn.functional as F

    from eellm_hf.modeling import EarlyExitGPTForCausalLM
    from eellm_hf.trainer.layer_dropout import layer_keep_mask
    from eellm_hf.trainer.weights import init_hf_state_dict

    torch.manual_seed(0)
    model = EarlyExitGPTForCausalLM(config)
    keep: dict[str, torch.Tensor] = {}  # layer dropout: the step's (batch, layers) mask
    autocast = (torch.autocast("cpu", dtype=getattr(torch, train.autocast)) if train.autocast
                else contextlib.nullcontext())

    def skip_layer(index: int):
        def hook(module, args, output):  # a skipped layer hands its input on unchanged
            return torch.where(keep["mask"][:, index].view(-1, 1, 1), output, args[0])
        return hook

    if train.layer_dropout is not None:
        hooks = [layer.register_forward_hook(skip_layer(i)) for i, layer in enumerate(model.model.layers)]
    model.load_state_dict(init_hf_state_dict(config, train.seed))
    model.train()
    params = [p for n, p in model.named_parameters()
              if not freeze or n.startswith("model.exits.") or (n.startswith("exit_lm_heads."))]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay, foreach=False)
    steps = []
    skipped = 0
    for step, (ids, labels) in enumerate(batches):
        if train.layer_dropout is not None:
            rates = train.layer_skip_rates_at(step, config.num_hidden_layers)
            keep["mask"] = layer_keep_mask(train.seed, step, ids.shape[0], rates)
            skipped += int((~keep["mask"]).sum())
        with autocast:
            out = model(input_ids=ids)
        n = int((labels != -100).sum())

        def ce(logits, labels=labels, n=n):
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum") / n

        teacher = out.logits.detach()

        def exit_loss(logits, teacher=teacher, labels=labels, n=n, w=train.exit_distillation):
            logits = logits / train.exit_temperature
            real = labels != -100
            if config.exit_vocab is not None:  # the shortlist's columns; a label off it costs no CE
                logits, teacher, labels = _on_shortlist(config.exit_vocab, logits, teacher, labels)
            if w == 0.0:
                return ce(logits, labels)
            kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                          reduction="none").sum(-1)
            return w * (kl * real).sum() / n + (1 - w) * ce(logits, labels)

        per_head = [exit_loss(x) for x in out.exit_logits] + [ce(out.logits)]
        weights = train.exit_loss_weights_at(step, config.exit_loss_weights)
        loss = per_head[-1] + sum(w * x for w, x in zip(weights, per_head[:-1]))
        gates = []
        for gate, exit_logits in zip(out.exit_gate_logits or (), out.exit_logits):
            agree = (exit_logits.argmax(-1) == out.logits.argmax(-1)).float()
            bce = F.binary_cross_entropy_with_logits(gate, agree, reduction="none")
            gates.append((bce * (labels != -100)).sum() / n)
        (loss + sum(gates)).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step)
        optimizer.step()
        optimizer.zero_grad()
        steps.append({"loss": loss.item(), "exit_losses": [x.item() for x in per_head], "grad_norm": norm.item(),
                      "exit_weights": weights, "skipped_layers": skipped, "gate_losses": [x.item() for x in gates]})
    if train.layer_dropout is not None:
        for handle in hooks:
            handle.remove()
    return model, steps


def _on_shortlist(shortlist, logits, teacher, labels):
    """Logits and teacher at the shortlist's columns, labels as columns there (-100 when off the shortlist)."""
    import torch

    ids = torch.tensor(shortlist)
    column = torch.full((logits.shape[-1],), -100)
    column[ids] = torch.arange(len(shortlist))
    return logits[..., ids], teacher[..., ids], torch.where(labels != -100, column[labels.clamp(min=0)], -100)


def _rel(a, b) -> float:
    """max |a - b| / max |b| over the finite entries of b (scalars or tensors); equal infinities (a shortlisted
    exit's -inf logits) agree."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    difference = torch.where(a == b, 0.0, a - b).abs().max()
    return float(difference / b[torch.isfinite(b)].abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
    """Run the worker once (all cases and layouts) and the single-process references."""
    import torch

    tmp = tmp_path_factory.mktemp("trainer_parallel")
    spec_cases, references = {}, {}
    batches, eval_batch = _batches(61)
    for name, case in CASES.items():
        config = _model_config(case)
        train_kwargs = {**BASE_TRAIN, **case["train"]}
        spec_cases[name] = {"config": config.to_dict(), "train": train_kwargs, "layouts": case["layouts"]}
        train = _train_config(train_kwargs)
        model, steps = _reference_run(config, train, batches, freeze=bool(train_kwargs.get("freeze_backbone")))
        with torch.no_grad():
            out = model.eval()(input_ids=eval_batch[0])
        logits = {j: x for j, x in enumerate(out.exit_logits)}
        logits[len(out.exit_logits)] = out.logits
        references[name] = {"config": config, "steps": steps, "state": model.state_dict(), "logits": logits}
    attention = {"config": _model_config({"model": ATTENTION_MODEL}).to_dict(), "attn_implementation": "eager",
                 "layout": dict(tp=2, pp=2, dp=1), "batch": eval_batch}
    spec_path = tmp / "spec.pt"
    torch.save({"cases": spec_cases, "batches": batches, "eval_batch": eval_batch, "attention": attention}, spec_path)
    out_dir = tmp / "out"
    out_dir.mkdir()
    launch(Path(__file__), 4, ["equivalence", str(spec_path), str(out_dir)], timeout_s=240)
    return {"dir": out_dir, "references": references}


def _results(equivalence: dict, case: str, layout: dict) -> dict:
    import torch

    name = f"{case}__{_layout_name(layout)}"
    result = torch.load(equivalence["dir"] / f"{name}.pt")
    result["logits"] = {}
    for path in sorted(equivalence["dir"].glob(f"{name}__logits_pp*.pt")):
        result["logits"].update(torch.load(path))
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_training_equals_single_process_hf(equivalence, case):
    """Per-step loss, per-head losses and gradient norm, then the weights after STEPS AdamW steps."""
    ref = equivalence["references"][case]
    rtol = CASES[case].get("rtol", RTOL)
    state_rtol = CASES[case].get("state_rtol", rtol)
    for layout in CASES[case]["layouts"]:
        got = _results(equivalence, case, layout)
        where = f"{case} {_layout_name(layout)}"
        for step, (g, r) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
            assert _rel(g["loss"], r["loss"]) < rtol, f"{where} step {step}: loss {g['loss']} != {r['loss']}"
            assert _rel(g["exit_losses"], r["exit_losses"]) < rtol, f"{where} step {step}: {g} != {r}"
            assert _rel(g["grad_norm"], r["grad_norm"]) < rtol, f"{where} step {step}: grad norm {g} != {r}"
            assert g["exit_weights"] == r["exit_weights"], f"{where} step {step}: exit weights"
            assert len(g["gate_losses"]) == len(r["gate_losses"]), where
            if r["gate_losses"]:
                assert _rel(g["gate_losses"], r["gate_losses"]) < rtol, f"{where} step {step}: gates {g} != {r}"
        assert set(got["state"]) == set(ref["state"]), where
        for key, value in ref["state"].items():
            assert got["state"][key].shape == value.shape, f"{where} {key}"
            assert got["state"][key].dtype == value.dtype, f"{where} {key}: {got['state'][key].dtype}"
            assert _rel(got["state"][key], value) < state_rtol, f"{where}: {key} differs after {STEPS} steps"


def test_layer_dropout_case_skips_layers(equivalence):
    """The layer-dropout case really skips layers: over its steps, some sequences skipped some layers."""
    assert equivalence["references"]["untied"]["steps"][-1]["skipped_layers"] > 0
    assert equivalence["references"]["tied"]["steps"][-1]["skipped_layers"] == 0  # off by default


def test_parallel_model_keeps_the_configs_attention_and_rope(equivalence):
    """Eager attention (the causal mask passed explicitly, not left to SDPA) and llama3 rotary scaling, in the
    backbone and in exit blocks: every head's logits under tp=2 x pp=2 equal the HF model's, same weights."""
    import torch

    from eellm_hf.modeling import EarlyExitGPTForCausalLM
    from eellm_hf.trainer.weights import init_hf_state_dict

    config = _model_config({"model": ATTENTION_MODEL})
    model = EarlyExitGPTForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    model.load_state_dict(init_hf_state_dict(config, BASE_TRAIN["seed"]))
    _, eval_batch = _batches(61)
    with torch.no_grad():
        out = model(input_ids=eval_batch[0])
    heads = [*out.exit_logits, out.logits]
    got = {}
    for path in equivalence["dir"].glob("attention__pp*.pt"):
        got.update(torch.load(path))
    assert sorted(got) == list(range(len(heads)))
    for head, logits in enumerate(heads):
        assert _rel(got[head], logits) < RTOL, head


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_weights_reproduce_parallel_logits(equivalence, case):
    """Every head's logits (TP-gathered, padding removed, on its own stage) equal the HF model's with the
    gathered weights: what an export contains is what the parallel model computes."""
    import torch

    from eellm_hf.modeling import EarlyExitGPTForCausalLM

    ref = equivalence["references"][case]
    for layout in CASES[case]["layouts"]:
        got = _results(equivalence, case, layout)
        model = EarlyExitGPTForCausalLM(ref["config"])
        model.load_state_dict(got["state"])
        batches, eval_batch = _batches(61)
        with torch.no_grad():
            out = model.eval()(input_ids=eval_batch[0])
        heads = [*out.exit_logits, out.logits]
        assert sorted(got["logits"]) == list(range(len(heads)))
        for head, logits in enumerate(heads):
            assert got["logits"][head].shape == logits.shape
            assert _rel(got["logits"][head], logits) < RTOL, f"{case} {_layout_name(layout)} head {head}"


@pytest.mark.parametrize("case", ["ee_tuning", "distill_autocast"])
def test_ee_tuning_leaves_backbone_bit_identical(equivalence, case):
    """Frozen backbone (under bf16 autocast too): its weights are bit-identical after training, every exit
    parameter moved, and no pipeline stage ever waited for a gradient from a later stage (they do with the
    backbone trained)."""
    import torch

    from eellm_hf.trainer.weights import init_hf_state_dict

    ref = equivalence["references"][case]
    init = init_hf_state_dict(ref["config"], BASE_TRAIN["seed"])
    # exit heads tied to the (frozen) final head do not train
    trained = ("model.exits.",) if ref["config"].tie_exit_heads else ("model.exits.", "exit_lm_heads.")
    for layout in CASES[case]["layouts"]:
        result = _results(equivalence, case, layout)
        state = result["state"]
        assert result["grad_messages"] == 0, layout
        # at pp > 1 every step but the last started the next one's first micro-batch (pp=1: nothing to overlap);
        # a step given another batch than the one started is refused, and the pipeline trains on after it
        assert result["prefetched_steps"] == (STEPS - 1 if layout["pp"] > 1 else 0), layout
        if layout["pp"] > 1:
            assert result["wrong_next"]["error"].startswith(f"train_step({STEPS + 1}): the batch is not the "
                                                            "`next_batch`"), result["wrong_next"]
            assert result["wrong_next"]["then"], layout
        else:
            assert result["wrong_next"] is None, layout
        changed = {k for k in init if not torch.equal(state[k], init[k])}
        exit_params = {k for k in init if k.startswith(trained)}
        assert changed <= exit_params, f"backbone changed: {sorted(changed - exit_params)}"
        assert changed == exit_params, f"exit parameters not trained: {sorted(exit_params - changed)}"
    assert _results(equivalence, "untied", dict(tp=2, pp=2, dp=1))["grad_messages"] > 0


# ------------------------------------------------------------------------------------------------------------
# Single-process pieces: names, ties, sharding, layout
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_initial_weights_and_ties_are_the_hf_models(case):
    """The initial state dict has the HF model's keys and shapes, and each parallel parameter is tied to the very
    parameter the HF model uses for it (embedding and final head, exits projecting with the final head)."""
    from eellm_hf.modeling import EarlyExitGPTForCausalLM
    from eellm_hf.trainer.parallel_model import HFParameters
    from eellm_hf.trainer.weights import init_hf_state_dict

    config = _model_config(CASES[case])
    model = EarlyExitGPTForCausalLM(config)
    state = init_hf_state_dict(config, seed=0)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    used = {name: model.get_parameter(name) for name in state}
    used.update({f"exit_lm_heads.{j}.weight": model.exit_projection(j).weight for j in range(config.num_exits)})
    sources = HFParameters.of(config).sources
    assert set(sources) == set(used)
    for name, source in sources.items():
        assert used[name] is model.get_parameter(source), (name, source)
        if name in state:
            assert state[name] is state[source], (name, source)


def test_shards_reassemble_with_vocab_padding():
    import torch

    from eellm_hf.trainer.parallel_model import padded_vocab_size
    from eellm_hf.trainer.weights import shard_tensor

    full = torch.randn(61, 8)
    padded = padded_vocab_size(61, 4)
    shards = [shard_tensor(full, "lm_head.weight", r, 4, padded) for r in range(4)]
    assert padded == 64 and all(s.shape == (16, 8) for s in shards)
    assert torch.equal(torch.cat(shards)[:61], full) and not torch.cat(shards)[61:].any()
    o_proj = torch.randn(8, 12)
    assert torch.equal(torch.cat([shard_tensor(o_proj, "model.layers.0.self_attn.o_proj.weight", r, 2, 0)
                                  for r in range(2)], dim=1), o_proj)
    bias = torch.randn(8)
    assert shard_tensor(bias, "model.layers.0.self_attn.o_proj.bias", 1, 2, 0) is None
    assert torch.equal(shard_tensor(bias, "model.layers.0.mlp.down_proj.bias", 0, 2, 0), bias)


def test_padded_logits_never_win_and_never_enter_the_loss():
    import torch

    from eellm_hf.trainer.loss import mask_padded_vocab

    logits = torch.zeros(2, 3, 8)
    masked = mask_padded_vocab(logits, vocab_size=13, tp_rank=1)  # this shard holds ids 8..15, 13..15 padding
    assert torch.isinf(masked[..., 5:]).all() and (masked[..., :5] == 0).all()
    assert mask_padded_vocab(logits, vocab_size=13, tp_rank=0) is logits


def test_exit_weight_schedule_of_the_tied_case_cools_down_and_warms_up():
    """The schedule both sides of the equivalence test use: absolute init 0.5 to each exit's own target."""
    train = _train_config({**BASE_TRAIN, **CASES["tied"]["train"]})
    targets = CASES["tied"]["model"]["exit_loss_weights"]
    assert train.exit_loss_weights_at(0, targets) == [0.5, 0.5, 0.5]
    assert train.exit_loss_weights_at(1, targets) == pytest.approx([0.4, 0.5, 0.6])  # cosine halfway
    assert train.exit_loss_weights_at(2, targets) == targets


def test_run_passes_the_configured_collective_timeout(monkeypatch, tmp_path):
    """`parallelism.timeout_s` reaches make_parallel_context (the groups' timeout), before any other work."""
    from eellm_hf.trainer import training_run
    from eellm_hf.trainer.config import load_config

    seen = {}

    class Stop(Exception):
        pass

    def fake_make_parallel_context(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise Stop

    monkeypatch.setattr(training_run, "make_parallel_context", fake_make_parallel_context)
    raw = _e2e_config(tmp_path)
    raw["parallelism"]["timeout_s"] = 42.5
    with pytest.raises(Stop):
        training_run.run(load_config(raw, world_size=2, check_files=False))
    assert seen == {"args": (1, 2, 1), "kwargs": {"timeout_s": 42.5}}


def test_layer_split_balances_cost_with_exit_heads():
    from eellm_hf.trainer.parallel_model import balanced_layer_split, exit_flops_per_token, layer_flops_per_token

    config = _model_config({"model": dict(vocab_size=4096, num_hidden_layers=8, exit_layers=[1, 2])})
    assert exit_flops_per_token(config) > 3 * layer_flops_per_token(config)
    split = balanced_layer_split(config, 2)
    assert sum(split) == 8 and split[0] < 4  # the exits' vocabulary projections weigh on stage 0
    assert balanced_layer_split(_model_config({"model": dict(vocab_size=64, num_hidden_layers=4)}), 4) == [1] * 4


# ------------------------------------------------------------------------------------------------------------
# End to end: the CLI on KJV text
# ------------------------------------------------------------------------------------------------------------


def _e2e_config(tmp: Path) -> dict:
    return {
        "model": {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "exit_layers": [1], "exit_loss_weights": [0.5], "tie_word_embeddings": True,
                  "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
        "parallelism": {"tp": 1, "pp": 2, "dp": 1, "timeout_s": 60},
        "data": {"files": [str(tmp / "kjv.txt")],
                 "tokenizer": {"train_bpe": {"vocab_size": 384, "out_dir": str(tmp / "tokenizer")}},
                 "seq_len": 32, "validation_sequences": 16},
        "train": {"steps": 30, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 3,
                  "min_lr": 1e-3, "val_interval": 15, "log_interval": 1,
                  "time_budget_minutes": 1000.0},  # fits far more than 30 steps: the total stays 30
        "checkpoint": {"dir": str(tmp / "ckpt"), "interval": 10},
        "run_dir": str(tmp / "run"),
        "export_hf": str(tmp / "hf"),
    }


@pytest.fixture(scope="module")
def kjv_run(tmp_path_factory) -> dict:
    """`python -m eellm_hf.trainer --config cfg.yaml` with 2 pipeline stages on a little KJV text (tokenizer
    trained by the run), checkpoints every 10 steps, HF export at the end; a time budget far above what 30 steps
    take."""
    import yaml

    from eellm_hf.trainer.data import bible_chapters
    from eellm_hf.trainer.metrics import read_metrics

    tmp = tmp_path_factory.mktemp("kjv_run")
    (tmp / "kjv.txt").write_text("\n\n".join(bible_chapters()[:30]) + "\n", encoding="utf-8")
    cfg = _e2e_config(tmp)
    config_path = tmp / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    launch(REPO_ROOT / "eellm_hf" / "trainer" / "__main__.py", 2, ["--config", str(config_path)], timeout_s=240)
    return {"dir": tmp, "cfg": cfg, "config_path": config_path, "metrics": read_metrics(cfg["run_dir"])}


def test_cli_metrics_and_loss_falls_on_kjv(kjv_run):
    metrics = kjv_run["metrics"]
    train = [e for e in metrics if e.get("split") == "train"]
    val = [e for e in metrics if e.get("split") == "validation"]
    assert [e["step"] for e in train] == list(range(1, 31))
    for entry in train:
        assert {"step", "loss", "exit_layers", "exit_losses", "lr", "grad_norm", "tokens_per_s"} <= set(entry)
        assert entry["exit_layers"] == [1] and len(entry["exit_losses"]) == 2  # exit after layer 1, then final
        exit_1, final = entry["exit_losses"]
        assert math.isclose(entry["loss"], final + 0.5 * exit_1, rel_tol=1e-9)
    # the time budget: total fixed after the calibration steps, here capped by train.steps
    (event,) = [e for e in metrics if "event" in e]
    assert event["event"] == "time_budget" and event["step"] == 4 and event["steps"] == 30
    assert event["step_time_s"] > 0 and event["max_steps"] == 30
    first = sum(e["loss"] for e in train[:3]) / 3
    last = sum(e["loss"] for e in train[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [e["step"] for e in val] == [15, 30]
    assert val[-1]["exit_losses"][-1] < val[0]["exit_losses"][-1]


def test_cli_export_reproduces_validation_losses(kjv_run):
    """The exported HF folder loads with AutoModelForCausalLM and gives the trainer's last validation losses."""
    val = [e for e in kjv_run["metrics"] if e.get("split") == "validation"]
    _check_export(kjv_run["dir"], kjv_run["cfg"], val[-1])


def test_cli_resume_gives_the_same_losses(kjv_run):
    """Remove the checkpoints after step 10 (as if killed at step 10-19) and resume: steps 11-30 log the same
    losses and gradient norms as the uninterrupted run. The resume config has a tiny time budget: the total of
    30 steps saved in the checkpoint is kept (recalibrating would stop at step 15)."""
    import shutil

    import yaml

    from eellm_hf.trainer.metrics import read_metrics

    cfg = kjv_run["cfg"]
    ckpt = Path(cfg["checkpoint"]["dir"])
    for later in ("step_000020", "step_000030", "latest"):
        path = ckpt / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    config_path = kjv_run["config_path"].with_name("resume.yaml")

    resumed = {**cfg, "checkpoint": {**cfg["checkpoint"], "resume": True},
               "train": {**cfg["train"], "time_budget_minutes": 1e-6}}
    resumed.pop("export_hf")
    with open(ckpt / "step_000010" / "rank_00000.json", encoding="utf-8") as f:
        assert '"total_steps": 30' in f.read()
    config_path.write_text(yaml.safe_dump(resumed))
    launch(REPO_ROOT / "eellm_hf" / "trainer" / "__main__.py", 2, ["--config", str(config_path)], timeout_s=240)
    before = [e for e in kjv_run["metrics"] if e.get("split") == "train"]
    after = read_metrics(cfg["run_dir"], split="train")
    assert [e["step"] for e in after] == list(range(1, 31))
    assert [e for e in read_metrics(cfg["run_dir"]) if "event" in e] == [e for e in kjv_run["metrics"] if "event" in e]
    for old, new in zip(before, after, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert math.isclose(old[key], new[key], rel_tol=1e-6), (old["step"], key, old[key], new[key])
        assert old["exit_losses"] == pytest.approx(new["exit_losses"], rel=1e-6)


def test_cli_ee_tuning_from_hf_export(kjv_run):
    """EE-Tuning from the exported folder (`model.init_from`, `train.freeze_backbone`): the exit trains, the
    backbone (embedding, layers, final norm and head) stays bit-identical through init, training and export.
    Under a tiny time budget with `steps` 50 as the upper bound: the run stops after the calibration steps plus
    one (step 5) on both ranks, and the learning rate decays to min_lr at that total, not at 50. The exits get a
    shortlist (`model.exit_vocab_size`): the training split's 96 most frequent labels, saved in the export."""
    import numpy as np
    import torch
    import yaml
    from safetensors.torch import load_file

    from eellm_hf.trainer.metrics import read_metrics

    cfg, tmp = kjv_run["cfg"], kjv_run["dir"]
    tuned = {
        **cfg,
        "model": {"init_from": cfg["export_hf"], "exit_vocab_size": 96},
        "data": {**cfg["data"], "tokenizer": cfg["export_hf"], "validation_sequences": 0},
        "train": {**cfg["train"], "steps": 50, "freeze_backbone": True, "val_interval": 0,
                  "time_budget_minutes": 1e-6},
        "run_dir": str(tmp / "run_tuned"),
        "export_hf": str(tmp / "hf_tuned"),
    }
    tuned.pop("checkpoint")
    config_path = tmp / "tuned.yaml"
    config_path.write_text(yaml.safe_dump(tuned))
    launch(REPO_ROOT / "eellm_hf" / "trainer" / "__main__.py", 2, ["--config", str(config_path)], timeout_s=240)
    metrics = read_metrics(tuned["run_dir"])
    train = [e for e in metrics if e.get("split") == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5]
    (event,) = [e for e in metrics if "event" in e]
    assert event["event"] == "time_budget" and event["step"] == 4 and event["steps"] == 5
    assert train[-1]["lr"] == pytest.approx(cfg["train"]["min_lr"])
    before = load_file(str(Path(cfg["export_hf"]) / "model.safetensors"))
    after = load_file(str(tmp / "hf_tuned" / "model.safetensors"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith(("model.exits.", "exit_lm_heads."))}, sorted(changed)
    rows = np.load(next((Path(tuned["run_dir"]) / "data_cache").glob("packed_*.npy")))  # all training rows
    counts = np.bincount(rows[:, 1:].reshape(-1), minlength=384)
    most_frequent = sorted(np.argsort(-counts, kind="stable")[:96].tolist())
    saved = json.loads((tmp / "hf_tuned" / "config.json").read_text())["exit_vocab"]
    assert saved == most_frequent and len(saved) == 96
    assert counts[saved].min() >= np.delete(counts, saved).max()  # no token off the shortlist is more frequent


def _check_export(tmp: Path, cfg: dict, last_val: dict) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import eellm_hf  # noqa: F401
    from eellm_hf.trainer.data import PackedDataset, train_val_split

    hf_dir = Path(cfg["export_hf"])
    assert (hf_dir / "generation_config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = PackedDataset.load(next((Path(cfg["run_dir"]) / "data_cache").glob("packed_*.npy"))).rows
    _, val = train_val_split(PackedDataset(rows), 16, seed=0)
    batch = val.batch(np.arange(len(val)))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"])
    heads = [*out.exit_logits, out.logits]
    losses = [float(F.cross_entropy(x.reshape(-1, x.shape[-1]), batch["labels"].reshape(-1))) for x in heads]
    expected = last_val["exit_losses"]
    assert np.allclose(losses, expected, rtol=1e-5), (losses, expected)
    assert len(tokenizer) <= model.config.vocab_size


if __name__ == "__main__":
    {"equivalence": _worker_equivalence}[sys.argv[1]](*sys.argv[2:])
