"""Tests of eellm_hf.trainer.nanotron_compat: nanotron 0.4 primitives on gloo/CPU, in real multi-process jobs.

Two launches: one 4-process job checks tensor parallelism, the pipeline engines, tied weights, DP sync,
gradient clipping and optimizers against dense single-process references in two layouts (tp2/pp2/dp1 and
tp1/pp2/dp2); one 3-process job checks that a hung or dead rank makes the others fail within the timeout.

This file is also the worker script: ``python tests/test_nanotron_compat.py {main,fault}``. Workers load
``nanotron_compat.py`` by path, without importing the ``eellm_hf`` package (which imports transformers and
would add ~5 s per rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:
    from tests.dist_utils import REPO_ROOT, launch
except ImportError:  # tests/ is not a package here: pytest put tests/ itself on sys.path
    from dist_utils import REPO_ROOT, launch

COMPAT_PATH = REPO_ROOT / "eellm_hf" / "trainer" / "nanotron_compat.py"
TOL = 1e-6
FAULT_TIMEOUT_S = 4.0


# ------------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------------


def _load_compat(path=COMPAT_PATH, name="nanotron_compat_under_test"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _load_rank_exit():
    """``eellm_hf/trainer/rank_exit.py`` (fail_fast), loaded from its file like the compat module."""
    return _load_compat(COMPAT_PATH.with_name("rank_exit.py"), "rank_exit_under_test")


def _emit(kind: str, payload: dict) -> None:
    print(f"{kind} " + json.dumps(payload), flush=True)


def _maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# ---- tensor parallel --------------------------------------------------------------------------------------


def _check_tensor_parallel(c, ctx) -> dict:
    import torch
    import torch.nn.functional as F

    tp_pg = ctx.tp_pg
    tp, r = tp_pg.size(), ctx.tp_rank
    g = torch.Generator().manual_seed(0)
    H, FF, V, B, S = 8, 16, 12, 2, 3
    w1, b1 = torch.randn(FF, H, generator=g) / H**0.5, torch.randn(FF, generator=g) * 0.1
    w2, b2 = torch.randn(H, FF, generator=g) / FF**0.5, torch.randn(H, generator=g) * 0.1
    emb = torch.randn(V, H, generator=g) / H**0.5
    x0 = torch.randn(B, S, H, generator=g)
    gy = torch.randn(B, S, H, generator=g)
    ids = torch.randint(0, V, (B, S), generator=g)
    tgt = torch.randint(0, V, (B, S), generator=g)

    # dense reference
    x_ref = x0.clone().requires_grad_(True)
    w1r, b1r, w2r, b2r = (t.clone().requires_grad_(True) for t in (w1, b1, w2, b2))
    y_ref = F.linear(F.gelu(F.linear(x_ref, w1r, b1r)), w2r, b2r)
    (y_ref * gy).sum().backward()

    mode = c.TensorParallelLinearMode.ALL_REDUCE
    col = c.TensorParallelColumnLinear(H, FF, pg=tp_pg, mode=mode, bias=True)
    row = c.TensorParallelRowLinear(FF, H, pg=tp_pg, mode=mode, bias=True)
    fs = FF // tp
    with torch.no_grad():
        col.weight.copy_(w1[r * fs : (r + 1) * fs])
        col.bias.copy_(b1[r * fs : (r + 1) * fs])
        row.weight.copy_(w2[:, r * fs : (r + 1) * fs])
        if row.bias is not None:
            row.bias.copy_(b2)
    x = x0.clone().requires_grad_(True)
    y = row(F.gelu(col(x)))
    (y * gy).sum().backward()
    out = {
        "tp_forward": _maxdiff(y, y_ref),
        "tp_grad_input": _maxdiff(x.grad, x_ref.grad),
        "tp_grad_col_weight": _maxdiff(col.weight.grad, w1r.grad[r * fs : (r + 1) * fs]),
        "tp_grad_col_bias": _maxdiff(col.bias.grad, b1r.grad[r * fs : (r + 1) * fs]),
        "tp_grad_row_weight": _maxdiff(row.weight.grad, w2r.grad[:, r * fs : (r + 1) * fs]),
    }
    if row.bias is not None:
        out["tp_grad_row_bias"] = _maxdiff(row.bias.grad, b2r.grad)
    out["tp_row_bias_only_on_rank0"] = float((row.bias is not None) != (r == 0))

    # vocab-parallel embedding + sharded cross-entropy vs dense
    emb_ref = emb.clone().requires_grad_(True)
    logits_ref = F.embedding(ids, emb_ref) @ emb_ref.t()
    loss_ref = F.cross_entropy(logits_ref.reshape(-1, V), tgt.reshape(-1))
    loss_ref.backward()
    temb = c.TensorParallelEmbedding(V, H, pg=tp_pg, mode=mode)
    vs = V // tp
    with torch.no_grad():
        temb.weight.copy_(emb[r * vs : (r + 1) * vs])
    h = temb(ids)  # full hidden (all-reduced in forward)
    # the tied "LM head": identity forward, all-reduce of the input grad in backward (what a column linear does)
    sharded_logits = c.differentiable_identity(h, group=tp_pg) @ temb.weight.t()  # this rank's vocab slice
    loss = c.sharded_cross_entropy(sharded_logits, tgt, group=tp_pg).mean()
    loss.backward()
    out["tp_embedding_ce_loss"] = _maxdiff(loss, loss_ref)
    out["tp_embedding_ce_grad"] = _maxdiff(temb.weight.grad, emb_ref.grad[r * vs : (r + 1) * vs])
    return out


# ---- pipeline ---------------------------------------------------------------------------------------------


V_PP, H_PP = 10, 6


def _pp_modules(c, ctx, torch):
    """Stage modules: TP-sharded embedding, dense residual blocks, TP-sharded LM head + sharded CE."""
    from torch import nn

    mode = c.TensorParallelLinearMode.ALL_REDUCE
    tp_pg = ctx.tp_pg

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = c.TensorParallelEmbedding(V_PP, H_PP, pg=tp_pg, mode=mode)

        def forward(self, input_ids):
            return {"hidden": self.token(input_ids)}

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(H_PP, H_PP)

        def forward(self, hidden):
            return {"hidden": torch.tanh(self.linear(hidden)) + hidden}

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = c.TensorParallelColumnLinear(H_PP, V_PP, pg=tp_pg, mode=mode, bias=False)

        def forward(self, hidden, labels):
            sharded_logits = self.lm_head(hidden)
            return {"loss": c.sharded_cross_entropy(sharded_logits, labels, group=tp_pg).mean()}

    return Embed, Block, Head


def _init_params(torch):
    g = torch.Generator().manual_seed(1)
    return {
        "embed": torch.randn(V_PP, H_PP, generator=g) * 0.5,
        "block0.w": torch.randn(H_PP, H_PP, generator=g) * 0.5,
        "block0.b": torch.randn(H_PP, generator=g) * 0.1,
        "block1.w": torch.randn(H_PP, H_PP, generator=g) * 0.5,
        "block1.b": torch.randn(H_PP, generator=g) * 0.1,
    }


def _make_data(torch, n_micro: int, mbs: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V_PP, (n_micro, mbs, seq), generator=g)
    labels = torch.randint(0, V_PP, (n_micro, mbs, seq), generator=g)
    return ids, labels


def _dense_reference(torch, ids, labels):
    """Dense single-process model with the tied embedding; loss = mean over micro-batches of mean CE."""
    import torch.nn.functional as F

    p = {k: v.clone().requires_grad_(True) for k, v in _init_params(torch).items()}
    total = 0.0
    for m in range(ids.shape[0]):
        h = F.embedding(ids[m], p["embed"])
        h = torch.tanh(F.linear(h, p["block0.w"], p["block0.b"])) + h
        h = torch.tanh(F.linear(h, p["block1.w"], p["block1.b"])) + h
        logits = h @ p["embed"].t()
        total = total + F.cross_entropy(logits.reshape(-1, V_PP), labels[m].reshape(-1))
    loss = total / ids.shape[0]
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in p.items()}


def _build_pp_model(c, ctx, torch):
    from torch import nn

    Embed, Block, Head = _pp_modules(c, ctx, torch)
    p2p = c.make_p2p(ctx)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = c.PipelineBlock(p2p, Embed, {}, {"input_ids"}, {"hidden"})
            self.block0 = c.PipelineBlock(p2p, Block, {}, {"hidden"}, {"hidden"})
            self.block1 = c.PipelineBlock(p2p, Block, {}, {"hidden"}, {"hidden"})
            self.head = c.PipelineBlock(p2p, Head, {}, {"hidden", "labels"}, {"loss"})

        def forward(self, input_ids, labels):
            h = self.embed(input_ids=input_ids)["hidden"]
            h = self.block0(hidden=h)["hidden"]
            h = self.block1(hidden=h)["hidden"]
            return self.head(hidden=h, labels=labels)

    model = Model()
    last = ctx.pp_pg.size() - 1
    for block, stage in ((model.embed, 0), (model.block0, 0), (model.block1, last), (model.head, last)):
        block.build_and_set_rank(stage)
    init = _init_params(torch)
    with torch.no_grad():
        for param, key, sl in _local_params(model, ctx).values():
            param.copy_(init[key][sl])
    # Tie the embedding (first stage) and the LM head (last stage) of this model replica (same tp, dp).
    c.tie_parameters(
        root_module=model,
        ties=[
            ("embed.pp_block.token.weight", (ctx.global_rank(pp_rank=0),)),
            ("head.pp_block.lm_head.weight", (ctx.global_rank(pp_rank=last),)),
        ],
        parallel_context=ctx,
        reduce_op=c.dist.ReduceOp.SUM,
    )
    c.tie_replicated_parameters(model, ctx)
    return model


def _local_params(model, ctx) -> dict:
    """name -> (parameter on this rank, key of the dense parameter, slice of it held here)."""
    last = ctx.pp_pg.size() - 1
    vs = V_PP // ctx.tp_pg.size()
    shard = slice(ctx.tp_rank * vs, (ctx.tp_rank + 1) * vs)
    full = slice(None)
    out = {}
    if ctx.pp_rank == 0:
        out["embed"] = (model.embed.pp_block.token.weight, "embed", shard)
        out["block0.w"] = (model.block0.pp_block.linear.weight, "block0.w", full)
        out["block0.b"] = (model.block0.pp_block.linear.bias, "block0.b", full)
    if ctx.pp_rank == last:
        out["lm_head"] = (model.head.pp_block.lm_head.weight, "embed", shard)
        out["block1.w"] = (model.block1.pp_block.linear.weight, "block1.w", full)
        out["block1.b"] = (model.block1.pp_block.linear.bias, "block1.b", full)
    return out


def _micro_batches(c, ctx, ids, labels):
    last = ctx.pp_pg.size() - 1
    return [
        {
            "input_ids": ids[m] if ctx.pp_rank == 0 else c.TensorPointer(group_rank=0),
            "labels": labels[m] if ctx.pp_rank == last else c.TensorPointer(group_rank=last),
        }
        for m in range(ids.shape[0])
    ]


def _check_pipeline(c, ctx, prefix: str, engine_cls, n_micro: int = 4) -> dict:
    import torch

    dp, dp_rank = ctx.dp_pg.size(), ctx.dp_rank
    mbs = 2
    ids, labels = _make_data(torch, n_micro, mbs * dp, 5, seed=7)
    ref_loss, ref_grads = _dense_reference(torch, ids, labels)
    # this DP rank's share of every micro-batch
    my_ids = ids[:, dp_rank * mbs : (dp_rank + 1) * mbs]
    my_labels = labels[:, dp_rank * mbs : (dp_rank + 1) * mbs]

    model = _build_pp_model(c, ctx, torch)
    engine = engine_cls()
    outputs = engine.train_batch_iter(
        model=model,
        pg=ctx.pp_pg,
        batch=iter(_micro_batches(c, ctx, my_ids, my_labels)),
        nb_microbatches=n_micro,
        grad_accumulator=None,
    )
    c.sync_gradients_across_dp(model, dp_pg=ctx.dp_pg, reduce_op=c.dist.ReduceOp.AVG, grad_accumulator=None)
    c.sync_tied_weights_gradients(model, parallel_context=ctx, grad_accumulator=None)
    res = {}
    local = _local_params(model, ctx)
    for name, (param, key, sl) in local.items():
        res[f"{prefix}_grad_{name}"] = _maxdiff(param.grad, ref_grads[key][sl])
    last = ctx.pp_pg.size() - 1
    if ctx.pp_rank == last:
        loss = torch.stack([o["loss"] for o in outputs]).sum()  # engine already divided by n_micro
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG, group=ctx.dp_pg)
        res[f"{prefix}_loss"] = _maxdiff(loss, ref_loss)
    else:
        res[f"{prefix}_outputs_are_pointers"] = float(
            not all(isinstance(o["loss"], c.TensorPointer) for o in outputs)
        )

    # gradient clipping: global norm over the model-parallel group, tied weight counted once
    named = [(n, p) for n, p in c.named_params_with_correct_tied(model) if p.requires_grad]
    ref_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref_grads.values()]))
    before = {n: p.grad.clone() for n, p in named}
    norm = c.clip_grad_norm(ctx.mp_pg, named, max_norm=0.5, grad_accumulator=None)
    res[f"{prefix}_clip_norm"] = _maxdiff(norm, ref_norm)
    coef = min(1.0, 0.5 / (float(ref_norm) + 1e-6))
    res[f"{prefix}_clip_scaled"] = max(_maxdiff(p.grad, before[n] * coef) for n, p in named)

    # optimizer step (NamedOptimizer around SGD; ZeRO-1 when dp > 1) vs the dense update
    lr = 0.1
    if dp > 1:
        optim = c.ZeroDistributedOptimizer(
            named_params_or_groups=named,
            optimizer_builder=lambda groups: c.NamedOptimizer(
                groups, lambda pgs: torch.optim.SGD(pgs, lr=lr)
            ),
            dp_pg=ctx.dp_pg,
        )
    else:
        optim = c.NamedOptimizer(named, lambda pgs: torch.optim.SGD(pgs, lr=lr))
    optim.step()
    optim.zero_grad()
    init = _init_params(torch)
    for name, (param, key, sl) in local.items():
        expected = init[key][sl] - lr * coef * ref_grads[key][sl]
        res[f"{prefix}_sgd_{name}"] = _maxdiff(param, expected)
    return res


def _check_layout(c, ctx) -> dict:
    import torch

    tp, pp, dp = ctx.tp_pg.size(), ctx.pp_pg.size(), ctx.dp_pg.size()
    wr = torch.distributed.get_rank()
    expected = (wr // (tp * dp), (wr // tp) % dp, wr % tp)
    ok = tuple(ctx.get_3d_ranks(wr)) == expected == (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank)
    ok = ok and c.world_rank_of(*expected, dp_size=dp, tp_size=tp) == wr
    ok = ok and sorted(torch.distributed.get_process_group_ranks(ctx.tp_pg)) == [
        c.world_rank_of(expected[0], expected[1], t, dp_size=dp, tp_size=tp) for t in range(tp)
    ]
    ok = ok and sorted(torch.distributed.get_process_group_ranks(ctx.pp_pg)) == [
        c.world_rank_of(p, expected[1], expected[2], dp_size=dp, tp_size=tp) for p in range(pp)
    ]
    ok = ok and ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    ok = ok and ctx.timeout.total_seconds() == 60
    return {"layout_ok": float(not ok)}


def _check_build_model(c, ctx) -> dict:
    """nanotron's build_model through the wrapper: blocks placed by compute cost, parameters on CPU."""
    import torch
    from torch import nn

    p2p = c.make_p2p(ctx)

    class TwoBlocks(c.NanotronModel):
        def __init__(self):
            super().__init__()
            self.first = c.PipelineBlock(p2p, nn.Linear, {"in_features": 4, "out_features": 4}, {"input"}, {"x"})
            self.second = c.PipelineBlock(p2p, nn.Linear, {"in_features": 4, "out_features": 4}, {"input"}, {"x"})

        def init_model_randomly(self, config):
            pass

        def get_block_compute_costs(self):
            return {nn.Linear: 1}

    model = c.build_model(TwoBlocks, ctx, dtype=torch.float32)
    ok = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    # nanotron 0.4's greedy split: a block crossing the cost threshold stays on the earlier stage
    ok = ok and (model.first.rank, model.second.rank, model.output_pp_rank) == (0, 0, 1)
    explicit = TwoBlocks()
    c.place_pipeline_blocks(explicit, [0, 1], ctx)
    ok = ok and (explicit.first.rank, explicit.second.rank, explicit.output_pp_rank) == (0, 1, 1)
    ok = ok and hasattr(explicit.first, "pp_block") == (ctx.pp_rank == 0)
    ok = ok and hasattr(explicit.second, "pp_block") == (ctx.pp_rank == 1)
    ok = ok and all(p.device.type == "cpu" for p in explicit.parameters())
    return {"build_model_ok": float(not ok)}


def _worker_main() -> None:
    c = _load_compat()
    import torch

    torch.manual_seed(0)
    with _load_rank_exit().fail_fast():
        results = {}
        ctx = c.make_parallel_context(tp=2, pp=2, dp=1, timeout_s=60)
        results.update({f"A_{k}": v for k, v in _check_layout(c, ctx).items()})
        results.update(_check_tensor_parallel(c, ctx))
        results.update({f"A_{k}": v for k, v in _check_build_model(c, ctx).items()})
        results.update(_check_pipeline(c, ctx, "A_1f1b", c.OneForwardOneBackwardPipelineEngine))
        results.update(_check_pipeline(c, ctx, "A_afab", c.AllForwardAllBackwardPipelineEngine, n_micro=2))
        ctx_b = c.make_parallel_context(tp=1, pp=2, dp=2, timeout_s=60)
        results.update({f"B_{k}": v for k, v in _check_layout(c, ctx_b).items()})
        results.update(_check_pipeline(c, ctx_b, "B_1f1b", c.OneForwardOneBackwardPipelineEngine))
        _emit("RESULT", results)
        torch.distributed.barrier()


def _worker_fault(sync_dir: str) -> None:
    """Rank 2 hangs (until ranks 0 and 1 are past phase 1), rank 1 dies after phase 1, rank 0 ends with
    fail_fast's error. ``sync_dir``: where ranks 0 and 1 drop a file when phase 1 is over."""
    import os
    import time

    c = _load_compat()
    import torch

    ctx = c.make_parallel_context(tp=1, pp=1, dp=3, timeout_s=FAULT_TIMEOUT_S)
    pg01 = c.dist.new_group(ranks=[0, 1], timeout=ctx.timeout)  # collective: made by all ranks
    torch.distributed.barrier()
    rank = ctx.world_rank
    done = [Path(sync_dir) / f"phase1_rank{r}" for r in (0, 1)]
    if rank == 2:  # hung: never joins the collective; exits once the others have timed out
        deadline = time.monotonic() + 60
        while not all(f.exists() for f in done) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    # phase 1: a collective on a context group whose member hangs -> timeout
    t0 = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(4), group=ctx.dp_pg)
        _emit("PHASE1", {"elapsed": time.monotonic() - t0, "error": None})
    except Exception as exc:  # noqa: BLE001
        _emit("PHASE1", {"elapsed": time.monotonic() - t0, "error": str(exc)[:300]})
    done[rank].touch()
    if rank == 1:  # dead: exits without warning
        os._exit(0)
    time.sleep(0.5)
    # phase 2: a collective with a dead peer -> error; fail_fast reports it and exits with code 3
    with _load_rank_exit().fail_fast(exit_code=3):
        t0 = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.ones(4), group=pg01)
        finally:
            _emit("PHASE2", {"elapsed": time.monotonic() - t0})
    _emit("UNREACHABLE", {})


# ------------------------------------------------------------------------------------------------------------
# Pytest side
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_results() -> list[dict]:
    results = launch(Path(__file__), 4, ["main"], timeout_s=180)
    parsed = []
    for r in results:
        lines = r.lines_with("RESULT ")
        assert len(lines) == 1, f"rank {r.rank} printed no RESULT line:\n{r.stdout}\n{r.stderr}"
        parsed.append(json.loads(lines[0]))
    return parsed


def _assert_close(main_results: list[dict], prefix: str, min_checks: int) -> None:
    checked = 0
    for rank, res in enumerate(main_results):
        for key, value in res.items():
            if key.startswith(prefix):
                checked += 1
                assert value <= TOL, f"rank {rank}: {key} = {value:g} > {TOL}"
    assert checked >= min_checks, f"only {checked} values with prefix {prefix!r}"


def test_tensor_parallel_linear_and_embedding_match_dense(main_results):
    _assert_close(main_results, "tp_", min_checks=4 * 7)


def test_rank_layout_tp_fastest_then_dp_then_pp(main_results):
    _assert_close(main_results, "A_layout", 4)
    _assert_close(main_results, "B_layout", 4)


def test_build_model_places_blocks_on_cpu(main_results):
    _assert_close(main_results, "A_build_model", 4)


def test_pipeline_1f1b_with_tied_embedding_matches_dense(main_results):
    _assert_close(main_results, "A_1f1b_grad", 4 * 3)
    _assert_close(main_results, "A_1f1b_loss", 2)
    _assert_close(main_results, "A_1f1b_outputs_are_pointers", 2)


def test_pipeline_afab_matches_dense(main_results):
    _assert_close(main_results, "A_afab_grad", 4 * 3)
    _assert_close(main_results, "A_afab_loss", 2)


def test_pipeline_with_data_parallel_matches_dense(main_results):
    _assert_close(main_results, "B_1f1b_grad", 4 * 3)
    _assert_close(main_results, "B_1f1b_loss", 2)


def test_clip_grad_norm_and_optimizers_match_dense(main_results):
    for layout in ("A_1f1b", "A_afab", "B_1f1b"):
        _assert_close(main_results, f"{layout}_clip", 4 * 2)
        _assert_close(main_results, f"{layout}_sgd", 4 * 2)


def test_dead_or_hung_rank_makes_others_fail_within_timeout(tmp_path):
    results = launch(Path(__file__), 3, ["fault", str(tmp_path)], timeout_s=90, check=False)
    r0, r1, r2 = results
    info = "\n".join(f"rank {r.rank} rc={r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}" for r in results)
    assert r2.returncode == 0 and r1.returncode == 0, info
    for r in (r0, r1):
        (phase1,) = [json.loads(x) for x in r.lines_with("PHASE1 ")]
        assert phase1["error"] and "timed out" in phase1["error"].lower(), info
        assert FAULT_TIMEOUT_S - 0.5 <= phase1["elapsed"] <= FAULT_TIMEOUT_S + 5, info
    (phase2,) = [json.loads(x) for x in r0.lines_with("PHASE2 ")]
    assert phase2["elapsed"] <= FAULT_TIMEOUT_S + 5, info
    assert r0.returncode == 3, info
    assert "[rank 0/3] FATAL" in r0.stderr and "peer rank probably died" in r0.stderr, info
    assert "UNREACHABLE" not in r0.stdout, info


def test_circular_import_fixed_without_stub_left():
    import dataclasses
    import importlib

    import eellm_hf.trainer.nanotron_compat as c

    config_module = importlib.import_module("nanotron.config.config")
    nanotron_logging = importlib.import_module("nanotron.logging")

    assert sys.modules["nanotron.config.config"] is config_module
    assert dataclasses.is_dataclass(config_module.LoggingArgs)
    assert nanotron_logging.LoggingArgs is config_module.LoggingArgs
    c.fix_nanotron_circular_import()  # idempotent
    assert sys.modules["nanotron.config.config"] is config_module
    assert c.OneForwardOneBackwardPipelineEngine.__module__ == "nanotron.parallel.pipeline_parallel.engine"
    assert c.device_for_backend("gloo").type == "cpu"
    assert c.world_rank_of(1, 1, 1, dp_size=2, tp_size=2) == 7


def test_fp32_grad_accumulator_and_state_reset_on_cpu():
    import torch

    import eellm_hf.trainer.nanotron_compat as c

    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    named = [(n, c.NanotronParameter(p)) for n, p in lin.named_parameters()]
    for n, p in named:
        setattr(lin, n, p)
    acc = c.make_fp32_grad_accumulator(named, device=torch.device("cpu"))
    assert all(acc.get_grad_buffer(n).device.type == "cpu" for n, _ in named)
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    acc.backward(lin(x).float().sum())
    acc.backward(lin(x).float().sum())
    expected = 2 * x.float().sum(0)  # d/dW of sum over 2 outputs, accumulated twice
    assert torch.allclose(acc.get_grad_buffer("weight"), expected.expand(2, 3), rtol=2e-2, atol=2e-2)
    assert acc.get_parameter_for_optimizer("weight").dtype == torch.float32

    c.PipelineTrainBatchState.microbatches_activations_to_send.append(object())
    c.reset_pipeline_state()
    assert len(c.PipelineTrainBatchState.microbatches_activations_to_send) == 0


if __name__ == "__main__":
    {"main": _worker_main, "fault": _worker_fault}[sys.argv[1]](*sys.argv[2:])
