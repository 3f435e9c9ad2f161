"""Tests for eellm_hf.trainer.checkpoint: round trips, multi-rank commit, crash safety, pruning, validation."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import eellm_hf.trainer.checkpoint as ckpt
from eellm_hf.trainer.checkpoint import (
    OPTIMIZER_PREFIX,
    CheckpointMismatchError,
    capture_rng_state,
    flatten_optimizer_state,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
    unflatten_state,
)


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "weight_decay": 0.1}, {"params": model[2].parameters()}], lr=1e-2
    )
    return model, optimizer


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.rand(3, 4)
    loss = model(x).square().mean() + random.random() + float(np.random.rand())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _save(root: Path, step: int, tensors: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Path:
    return save_checkpoint(root, step, 0, 1, tensors or {"w": torch.full((2,), float(step))},
                           {"step": step}, None, **kwargs)


def test_round_trip_model_optimizer_rng(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        _train_step(model, optimizer)
        sched.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)

    opt_tensors, opt_state = flatten_optimizer_state(optimizer.state_dict())
    assert all(k.startswith(OPTIMIZER_PREFIX) for k in opt_tensors)
    state = {"step": 2, "optimizer": opt_state, "lr_scheduler": sched.state_dict(), "rng": capture_rng_state(),
             "data": {"consumed": 16, "nan": math.nan}, "pair": (1, "a"), "__odd": {0: "x"}}
    path = save_checkpoint(tmp_path, 2, 0, 1, {**model.state_dict(), **opt_tensors}, state, barrier=None,
                           layout={"tp": 1, "pp": 1, "dp": 1}, config_hash="abc")

    # uninterrupted continuation
    expected_rand = (torch.rand(5), random.random(), np.random.rand())
    _train_step(model, optimizer)
    expected_params = [p.detach().clone() for p in model.parameters()]

    # resume into fresh objects
    model2, optimizer2 = _model_and_optimizer(seed=42)
    sched2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0 / (s + 1))
    tensors, loaded = load_checkpoint(path, 0, world_size=1, layout={"tp": 1, "pp": 1, "dp": 1}, config_hash="abc")
    model2.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)})
    optimizer2.load_state_dict(unflatten_optimizer_state(tensors, loaded["optimizer"]))
    sched2.load_state_dict(loaded["lr_scheduler"])
    restore_rng_state(loaded["rng"])
    assert loaded["step"] == 2 and loaded["data"]["consumed"] == 16 and math.isnan(loaded["data"]["nan"])
    assert loaded["pair"] == (1, "a") and loaded["__odd"] == {0: "x"}
    assert sched2.last_epoch == sched.last_epoch
    assert isinstance(loaded["rng"]["torch"], torch.Tensor) and loaded["rng"]["torch"].dtype == torch.uint8
    assert torch.equal(torch.rand(5), expected_rand[0])
    assert random.random() == expected_rand[1] and np.random.rand() == expected_rand[2]
    _train_step(model2, optimizer2)
    for p, q in zip(model2.parameters(), expected_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nanotron_optimizer_state_dicts() -> None:
    import eellm_hf.trainer.nanotron_compat  # noqa: F401  (fixes nanotron's circular import)

    # isort: split
    from nanotron.optim.named_optimizer import NamedOptimizer

    model, _ = _model_and_optimizer()
    optimizer = NamedOptimizer(list(model.named_parameters()), lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    model(torch.rand(2, 4)).sum().backward()
    optimizer.step()
    state_dict = optimizer.state_dict()
    assert "names" in state_dict
    # OptimizerFromGradientAccumulator adds the fp32 master weights keyed by parameter name
    state_dict["gradient_accumulator"] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    tensors, skeleton = flatten_optimizer_state(state_dict)
    json.dumps(skeleton)
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(skeleton)))
    assert restored["names"] == state_dict["names"] and set(restored["state"]) == set(state_dict["state"])
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            assert torch.equal(restored["state"][index][key], value)
    assert restored["param_groups"] == state_dict["param_groups"]
    assert set(restored["gradient_accumulator"]) == set(state_dict["gradient_accumulator"])
    optimizer.load_state_dict(restored)  # accepted by nanotron's own checks


def test_flatten_state_edge_cases() -> None:
    shared = torch.arange(4.0)
    obj = {"a": [shared, shared[:2]], 3: {"t": torch.zeros(0)}, "dtype": torch.bfloat16, "inf": -math.inf,
           "arr": np.arange(3, dtype=np.int16), "np": np.float32(0.5)}
    tensors, skeleton = flatten_state(obj, "p/")
    assert set(tensors) == {"p/a/0", "p/a/1", "p/3/t"}
    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert back["dtype"] is torch.bfloat16 and back["inf"] == -math.inf and back["np"] == 0.5
    assert back["arr"].dtype == np.int16 and back["arr"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="object"):
        flatten_state({"x": object()})


def test_shared_and_odd_tensors_save(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    tensors = {"tied_a": base, "tied_b": base, "view": base[1:3], "t": base.view(2, 3).t(),
               "bf16": torch.ones(2, dtype=torch.bfloat16), "scalar": torch.tensor(7),
               "param": torch.nn.Parameter(base)}
    path = _save(tmp_path, 1, tensors)
    loaded, _ = load_checkpoint(path, 0)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value.detach()), key


def test_multi_rank_commit_and_mismatch(tmp_path: Path) -> None:
    world = 2
    barrier = threading.Barrier(world)
    results: dict[int, Path] = {}

    def rank_main(rank: int) -> None:
        results[rank] = save_checkpoint(tmp_path, 5, rank, world, {"shard": torch.full((3,), float(rank))},
                                        {"rank": rank}, barrier.wait, layout={"tp": 2}, config_hash="h")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0] == results[1] == tmp_path / "step_000005" == latest_checkpoint(tmp_path)
    assert sorted(p.name for p in results[0].iterdir()) == [
        "meta.json", "rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"]
    for rank in range(world):
        tensors, state = load_checkpoint(results[0], rank, world_size=2, layout={"tp": 2}, config_hash="h")
        assert state == {"rank": rank} and torch.equal(tensors["shard"], torch.full((3,), float(rank)))
    with pytest.raises(CheckpointMismatchError, match="saved by 2 ranks, this run has 4"):
        load_checkpoint(results[0], 0, world_size=4)
    with pytest.raises(CheckpointMismatchError, match=r"layout \{'tp': 2\}.*\{'pp': 2\}"):
        load_checkpoint(results[0], 0, layout={"pp": 2})
    with pytest.raises(CheckpointMismatchError, match="config hash h, this run's is other"):
        load_checkpoint(results[0], 0, config_hash="other")
    with pytest.raises(ValueError, match="needs a barrier"):
        save_checkpoint(tmp_path, 6, 0, 2, {}, {}, None)


def _die(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_in_child(point: str, root: Path) -> Callable[[], None]:
    """Arrange, in the forked child, to be SIGKILLed at ``point``; returns the barrier to use."""
    if point == "writing_tensors":
        def partial_write(tensors: dict[str, torch.Tensor], path: str, metadata: Any = None) -> None:
            Path(path).write_bytes(b"\x00" * 100)  # a torn file
            _die()
        ckpt.save_file = partial_write  # type: ignore[assignment]
    if point == "committing_dir":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(src).name.startswith(".eellm_tmp_"):
                _die()
            real_replace(src, dst)
        ckpt.os.replace = replace  # type: ignore[assignment]  (the child's copy of `os`)
    if point == "updating_latest":
        def write_text(path: Path, text: str, atomic: bool = False) -> None:
            if atomic:  # only the `latest` pointer is written atomically
                _die()
            _write_text_orig(path, text)
        ckpt._write_text = write_text  # type: ignore[assignment]
    calls = {"n": 0}

    def barrier() -> None:
        calls["n"] += 1
        if point == "after_rank_files" and calls["n"] == 2:
            _die()
    return barrier


_write_text_orig = ckpt._write_text


@pytest.mark.parametrize("point", ["writing_tensors", "after_rank_files", "committing_dir", "updating_latest"])
def test_kill_during_save_keeps_last_good_checkpoint(tmp_path: Path, point: str) -> None:
    good = _save(tmp_path, 1, keep_last=1)
    pid = os.fork()
    if pid == 0:  # child: start saving step 2 and get killed part-way
        try:
            barrier = _patch_in_child(point, tmp_path)
            save_checkpoint(tmp_path, 2, 0, 1, {"w": torch.full((2,), 2.0)}, {"step": 2}, barrier, keep_last=1)
        finally:
            os._exit(3)  # not reached when the kill happened
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    latest = latest_checkpoint(tmp_path)
    assert latest == good  # `latest` still names step 1 even when step 2 got committed before the kill
    tensors, state = load_checkpoint(latest, 0)
    assert state == {"step": 1} and torch.equal(tensors["w"], torch.full((2,), 1.0))
    if point == "updating_latest":
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]
    else:
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]

    # the next save cleans the leftovers and commits normally
    again = _save(tmp_path, 2, keep_last=1)
    assert latest_checkpoint(tmp_path) == again and load_checkpoint(again, 0)[1] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002"]


def test_exception_mid_save_then_recovery(tmp_path: Path) -> None:
    good = _save(tmp_path, 1)

    def failing_barrier() -> None:
        raise RuntimeError("peer died")

    with pytest.raises(RuntimeError, match="peer died"):
        save_checkpoint(tmp_path, 2, 0, 1, {"w": torch.zeros(1)}, {}, failing_barrier, run_id="00ff" * 4)
    leftover = tmp_path / ".eellm_tmp_00ff00ff00ff00ff_step_000002"
    assert leftover.is_dir()  # leftover, ignored
    assert latest_checkpoint(tmp_path) == good and list_checkpoints(tmp_path) == [good]
    (tmp_path / "latest").unlink()  # without the pointer, the newest committed checkpoint is used
    assert latest_checkpoint(tmp_path) == good
    _save(tmp_path, 3)
    assert not leftover.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"


def test_pruning_and_resave(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nothing") is None
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    path = _save(tmp_path, 5, {"w": torch.full((2,), 50.0)}, keep_last=2)  # re-saving a step replaces it
    assert torch.equal(load_checkpoint(path, 0)[0]["w"], torch.full((2,), 50.0))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert ckpt.checkpoint_step(path) == 5
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / ".tmp_step_000009", 0)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate_tensors", "truncate_json", "delete_json",
                                    "flip_json_byte"])
def test_checksums_name_the_damaged_file(tmp_path: Path, damage: str) -> None:
    """Every rank file's size and sha256 are recorded at commit; any damage is named on load."""
    path = _save(tmp_path, 1, {"w": torch.arange(1000.0)})
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"rank_00000.json", "rank_00000.safetensors"}
    ckpt.verify_checkpoint(path)
    tensors_file, json_file = path / "rank_00000.safetensors", path / "rank_00000.json"
    if damage == "flip_tensor_byte":
        _flip_byte(tensors_file, tensors_file.stat().st_size - 100)  # tensor data, not the header
        bad, match = tensors_file, "does not match the sha256"
    elif damage == "truncate_tensors":
        tensors_file.write_bytes(tensors_file.read_bytes()[:2000])
        bad, match = tensors_file, "2000 bytes"
    elif damage == "truncate_json":
        json_file.write_bytes(json_file.read_bytes()[:10])
        bad, match = json_file, "10 bytes"
    elif damage == "delete_json":
        json_file.unlink()
        bad, match = json_file, "missing"
    else:
        _flip_byte(json_file, 40)
        bad, match = json_file, "does not match the sha256"
    for check in (lambda: ckpt.verify_checkpoint(path), lambda: load_checkpoint(path, 0)):
        with pytest.raises(ckpt.CheckpointCorruptError, match=match) as info:
            check()
        assert str(bad) in str(info.value)


def test_damaged_meta_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    text = (path / "meta.json").read_text()
    (path / "meta.json").write_text(text.replace('"step": 1', '"step": 7'))  # still valid JSON
    with pytest.raises(ckpt.CheckpointCorruptError, match="meta.json does not match the sha256 recorded in it"):
        load_checkpoint(path, 0)
    (path / "meta.json").write_text(text[:20])
    with pytest.raises(ckpt.CheckpointCorruptError, match="meta.json is unreadable"):
        load_checkpoint(path, 0)


def test_resume_candidates_newest_first_from_latest(tmp_path: Path) -> None:
    assert ckpt.resume_candidates(tmp_path / "none") == []
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert [p.name for p in ckpt.resume_candidates(tmp_path)] == ["step_000003", "step_000002", "step_000001"]
    (tmp_path / "latest").write_text("step_000002\n")  # a kill before `latest` moved on: step 3 is not used
    assert [p.name for p in ckpt.resume_candidates(tmp_path)] == ["step_000002", "step_000001"]


def test_saving_leaves_other_entries_of_the_folder_alone(tmp_path: Path) -> None:
    """Only the trainer's own temporaries are cleaned up: a user's `.tmp_*` / `.trash_*` folders survive."""
    for name in (".tmp_real_user_dir", ".trash_notes", ".eellm_tmp_user"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    (tmp_path / ".eellm_tmp_0123456789abcdef_step_000007").mkdir()  # a leftover of an interrupted save
    _save(tmp_path, 1, keep_last=1)
    _save(tmp_path, 2, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".eellm_tmp_user", ".tmp_real_user_dir", ".trash_notes", "latest", "step_000002"]
    assert all((tmp_path / n / "keep.txt").read_text() == "mine" for n in (".tmp_real_user_dir", ".trash_notes"))
    assert ckpt.is_trainer_temporary(".eellm_trash_0123456789abcdef_step_000001_1_2")
    assert not ckpt.is_trainer_temporary(".tmp_step_000001")
    with pytest.raises(ValueError, match="run_id"):
        _save(tmp_path, 3, run_id="../evil")


def test_optimizer_state_saved_for_another_parameter_order_is_refused():
    """Optimizer state is indexed by parameter position; nanotron's NamedOptimizer checks only the set of names,
    so a checkpoint from a version that ordered parameters differently would put Adam moments on other
    parameters. Resuming refuses it, naming the first mismatch."""
    import torch

    from eellm_hf.trainer.checkpoint import CheckpointMismatchError
    from eellm_hf.trainer.nanotron_compat import NamedOptimizer
    from eellm_hf.trainer.resume import check_optimizer_order

    first, second = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))

    def adamw(named):
        return NamedOptimizer(named, lambda groups: torch.optim.AdamW(groups, lr=0.1))

    saved_optimizer = adamw([("first", first), ("second", second)])
    (first.sum() + 2 * second.sum()).backward()
    saved_optimizer.step()
    saved = saved_optimizer.state_dict()
    same_order = adamw([("first", first), ("second", second)])
    check_optimizer_order(same_order, saved, "ckpt/step_1")
    same_order.load_state_dict(saved)
    with pytest.raises(CheckpointMismatchError, match=r"ckpt/step_1: .*parameter 0 = 'first'.*'second' there"):
        check_optimizer_order(adamw([("second", second), ("first", first)]), saved, "ckpt/step_1")
