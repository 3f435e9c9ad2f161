"""Atomic, sharded, pickle-free training checkpoints.

Layout::

    CKPT_DIR/
      latest                      # text file: the name of the newest committed checkpoint ("step_000012")
      step_000012/
        rank_00000.safetensors    # this rank's tensors (model shard, optimizer state, RNG state tensors, ...)
        rank_00000.json           # this rank's non-tensor state (JSON; tensors replaced by references)
        ...                       # one pair per rank
        meta.json                 # written last: step, world size, layout, config hash, format, the
                                  # size and sha256 of every rank file, and the sha256 of its own content

Saving (:func:`save_checkpoint`, called by every rank with the same ``step``):

1. rank 0 deletes leftovers of interrupted saves (the trainer's own temporaries only: names
   ``.eellm_tmp_<run id>_*`` and ``.eellm_trash_<run id>_*``, see :func:`is_trainer_temporary`) and creates
   ``CKPT_DIR/.eellm_tmp_<run id>_step_000012/``; barrier;
2. every rank writes (and fsyncs) its two files there, the JSON one recording the sha256 of the tensors; barrier;
3. rank 0 checks that all ``world_size`` pairs are there, writes ``meta.json`` with every file's size and sha256,
   renames the directory to ``step_000012`` (atomic), points ``latest`` at it (temporary file + ``os.replace``,
   atomic) and prunes old checkpoints (``keep_last``; each renamed to a trash name before it is deleted); barrier.

A process killed at any point leaves the previous checkpoint intact and ``latest`` loadable: a checkpoint
directory only ever appears complete. ``CKPT_DIR`` must be visible to every rank (one node, or a shared file
system). Other entries of ``CKPT_DIR`` (a user's own files or folders) are never touched.

Loading: ``path = latest_checkpoint(ckpt_dir)`` then ``tensors, state = load_checkpoint(path, rank, ...)``;
``world_size``, ``layout`` and ``config_hash`` given to both must match, else ``CheckpointMismatchError``. The
rank's files are checked against the sizes and sha256 sums of ``meta.json`` first: a flipped bit, a truncated
or unreadable file raises :class:`CheckpointCorruptError` naming the file (:func:`verify_checkpoint` checks
any set of ranks). :func:`resume_candidates` lists the checkpoints to try in order, ``latest`` first.

``state`` is any JSON-like structure (dicts, lists, tuples, str/int/float/bool/None, small numpy arrays); it may
also hold tensors anywhere (e.g. the torch RNG state of :func:`capture_rng_state`, or a raw
``optimizer.state_dict()``), which are stored in the rank's safetensors file under ``__state__/...`` and put
back on load. Dict keys may be ``int`` (as in optimizer state dicts) and survive the round trip.

Typical use in a training loop::

    opt_tensors, opt_state = flatten_optimizer_state(optimizer.state_dict())
    save_checkpoint(ckpt_dir, step, rank, world_size,
                    tensors={**model_shard_state_dict, **opt_tensors},
                    state={"step": step, "optimizer": opt_state, "lr_scheduler": sched.state_dict(),
                           "rng": capture_rng_state(), "consumed_samples": ...},
                    barrier=lambda: dist.barrier(), layout={"tp": tp, "pp": pp, "dp": dp},
                    config_hash=cfg.fingerprint(), keep_last=cfg.checkpoint.keep_last)
    ...
    tensors, state = load_checkpoint(path, rank, world_size=..., layout=..., config_hash=...)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)})
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    restore_rng_state(state["rng"])

Optimizer state dicts of torch optimizers and of nanotron's wrappers (``NamedOptimizer`` adds
``"names": {index: param_name}``, ``OptimizerFromGradientAccumulator`` adds ``"gradient_accumulator": {name:
fp32 tensor}``, ``ZeroDistributedOptimizer`` returns its inner optimizer's, i.e. this DP rank's shard) are all
nested dicts/lists of tensors and scalars with int keys, which :func:`flatten_optimizer_state` handles generically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .state_tensors import (
    OPTIMIZER_PREFIX,
    capture_rng_state,
    flatten_optimizer_state,
    flatten_state,
    restore_rng_state,
    unflatten_optimizer_state,
    unflatten_state,
)

__all__ = [
    "FORMAT_VERSION",
    "OPTIMIZER_PREFIX",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "capture_rng_state",
    "checkpoint_step",
    "flatten_optimizer_state",
    "flatten_state",
    "is_trainer_temporary",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "restore_rng_state",
    "resume_candidates",
    "save_checkpoint",
    "unflatten_optimizer_state",
    "unflatten_state",
    "verify_checkpoint",
]

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # format 1: no checksums (loaded unverified)
_STATE_PREFIX = "__state__/"
_STEP_RE = re.compile(r"^step_(\d+)$")
_LATEST = "latest"
_META = "meta.json"
_TEMP_RE = re.compile(r"^\.eellm_(tmp|trash)_[0-9a-f]{16}_")
_HASH_CHUNK = 1 << 24

Barrier = Callable[[], None]


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with another world size, layout or config."""


class CheckpointCorruptError(ValueError):
    """A checkpoint file is missing, truncated, unreadable or differs from the sha256 recorded at commit."""


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _rank_stem(rank: int) -> str:
    return f"rank_{rank:05d}"


# ------------------------------------------------------------------------------------------------------------
# File helpers
# ------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str, atomic: bool = False) -> None:
    target = path.with_name(path.name + ".partial") if atomic else path
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
        _fsync_dir(path.parent)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, plain CPU tensors, cloned where two would share memory (safetensors refuses it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach()
        if type(t) is not torch.Tensor:
            t = t.clone()
            if type(t) is not torch.Tensor:
                t = t.as_subclass(torch.Tensor)
        t = t.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path, run_id: str) -> None:
    """Delete a directory, first renaming it (atomically) so that a partly deleted one is never mistaken for
    a checkpoint."""
    trash = path.with_name(f".eellm_trash_{run_id}_{path.name}_{os.getpid()}_{time.monotonic_ns()}")
    os.replace(path, trash)
    _remove_tree(trash)


def is_trainer_temporary(name: str) -> bool:
    """Whether ``name`` (an entry of a checkpoint folder) is a temporary that :func:`save_checkpoint` made
    (``.eellm_tmp_<16 hex digits>_...`` or ``.eellm_trash_<16 hex digits>_...``): only those are ever deleted
    as leftovers, whatever else the folder holds."""
    return _TEMP_RE.match(name) is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _default_run_id(root: Path, step: int, world_size: int) -> str:
    return hashlib.sha256(f"{root.resolve()}:{step}:{world_size}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------------


def _as_barrier(barrier: Barrier | Any | None, world_size: int) -> Barrier:
    if barrier is None:
        if world_size != 1:
            raise ValueError("save_checkpoint needs a barrier (callable or process group) when world_size > 1")
        return lambda: None
    if callable(barrier):
        return barrier
    import torch.distributed as dist

    return lambda: dist.barrier(group=barrier)


def save_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    step: int,
    rank: int,
    world_size: int,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    barrier: Barrier | Any | None,
    *,
    layout: Mapping[str, int] | None = None,
    config_hash: str | None = None,
    keep_last: int | None = None,
    run_id: str | None = None,
) -> Path:
    """Write this rank's part of checkpoint ``step`` and commit it atomically (see the module docstring).

    Every rank calls it with the same ``step``, ``world_size``, ``layout``, ``config_hash`` and ``keep_last``.
    ``tensors``: this rank's tensors (flat ``{str: Tensor}``; keys must not start with ``__state__/``).
    ``state``: JSON-like state, tensors allowed. ``barrier``: a callable, or a ``torch.distributed``
    process group spanning the ``world_size`` ranks (None only when ``world_size == 1``). ``layout``: e.g.
    ``{"tp": 1, "pp": 2, "dp": 1}``. ``keep_last``: keep only the newest N checkpoints. ``run_id``: 16 hex
    digits naming this run's temporaries, the same on every rank (default: derived from the folder and step).
    Returns the checkpoint's directory (on every rank, after it is committed).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    bad = [k for k in tensors if k.startswith(_STATE_PREFIX)]
    if bad:
        raise ValueError(f"tensor keys may not start with {_STATE_PREFIX!r}: {bad[:3]}")
    sync = _as_barrier(barrier, world_size)
    root = Path(ckpt_dir)
    run_id = run_id if run_id is not None else _default_run_id(root, step, world_size)
    if re.fullmatch(r"[0-9a-f]{16}", run_id) is None:
        raise ValueError(f"run_id must be 16 lowercase hex digits, got {run_id!r}")
    final = root / _step_name(step)
    tmp = root / f".eellm_tmp_{run_id}_{_step_name(step)}"

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():
            if is_trainer_temporary(leftover.name):
                _remove_tree(leftover)
        tmp.mkdir()
    sync()

    state_tensors, skeleton = flatten_state(dict(state), _STATE_PREFIX)
    stem = _rank_stem(rank)
    tensors_path = tmp / f"{stem}.safetensors"
    _write_tensors(tensors_path, _prepare_tensors({**tensors, **state_tensors}))
    rank_info = {"format": FORMAT_VERSION, "step": step, "rank": rank, "world_size": world_size,
                 "tensors": {"file": tensors_path.name, **_file_record(tensors_path)}, "state": skeleton}
    _write_text(tmp / f"{stem}.json", json.dumps(rank_info, indent=1))
    sync()

    if rank == 0:
        missing = [
            name for r in range(world_size) for name in (f"{_rank_stem(r)}.safetensors", f"{_rank_stem(r)}.json")
            if not (tmp / name).is_file()
        ]
        if missing:
            raise RuntimeError(f"checkpoint {final} incomplete, missing {missing[:4]}: is {root} shared by all ranks?")
        meta = {
            "format": FORMAT_VERSION, "step": step, "world_size": world_size,
            "layout": dict(layout) if layout is not None else None, "config_hash": config_hash,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _committed_files(tmp, world_size),
        }
        meta["meta_sha256"] = _json_sha256(meta)
        _write_text(tmp / _META, json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            _discard(final, run_id)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text(root / _LATEST, final.name + "\n", atomic=True)
        if keep_last is not None:
            for old in list_checkpoints(root)[:-keep_last]:
                if old != final:
                    _discard(old, run_id)
    sync()
    return final


def _committed_files(tmp: Path, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every rank file (the tensors' as each rank recorded them, the JSON files' hashed
    here: they are small)."""
    files: dict[str, dict[str, Any]] = {}
    for r in range(world_size):
        json_path = tmp / f"{_rank_stem(r)}.json"
        with open(json_path, encoding="utf-8") as f:
            record = json.load(f)["tensors"]
        files[record["file"]] = {"size": record["size"], "sha256": record["sha256"]}
        files[json_path.name] = _file_record(json_path)
    return files


# ------------------------------------------------------------------------------------------------------------
# Find and load
# ------------------------------------------------------------------------------------------------------------


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Committed checkpoints (``step_*`` directories with a ``meta.json``), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and (p / _META).is_file()]
    return [p for _, p in sorted(found)]


def resume_candidates(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints to try when resuming, in order: :func:`latest_checkpoint`, then every older committed
    one, newest first (the fallbacks when a newer one fails :func:`verify_checkpoint`)."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return []
    older = [p for p in list_checkpoints(ckpt_dir) if _step_of(p) < _step_of(latest)]
    return [latest, *reversed(older)]


def _step_of(path: Path) -> int:
    match = _STEP_RE.match(path.name)
    assert match is not None
    return int(match.group(1))


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint named by ``ckpt_dir/latest``, or, if that is missing or names no committed checkpoint,
    the newest committed one; None when there is none."""
    root = Path(ckpt_dir)
    pointer = root / _LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_RE.match(name) and (root / name / _META).is_file():
            return root / name
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory (``FileNotFoundError`` if it is not a committed checkpoint)."""
    meta_path = Path(path) / _META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_META})")
    meta = _read_json(meta_path)
    recorded = meta.pop("meta_sha256", None)
    if recorded is None and meta.get("format") != 1:
        raise CheckpointCorruptError(f"checkpoint file {meta_path} has no meta_sha256 (damaged)")
    if recorded is not None and recorded != _json_sha256(meta):
        raise CheckpointCorruptError(f"checkpoint file {meta_path} does not match the sha256 recorded in it "
                                     "(corrupted)")
    return meta


def _json_sha256(obj: Any) -> str:
    """sha256 of a JSON object's canonical text (a file's own checksum cannot cover its own bytes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"checkpoint file {path} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointCorruptError(f"checkpoint file {path} holds a {type(data).__name__}, not a JSON object")
    return data


def verify_checkpoint(path: str | os.PathLike[str], ranks: Sequence[int] | None = None) -> None:
    """Check the files of ``ranks`` (default: every rank) of a committed checkpoint against the sizes and
    sha256 sums recorded in its ``meta.json``. Raises :class:`CheckpointCorruptError` naming the first file
    that is missing, has another size (truncated) or another sha256 (corrupted). Checkpoints of format 1 carry
    no sums: only their files' presence is checked."""
    path = Path(path)
    meta = read_meta(path)
    world_size = meta.get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointCorruptError(f"{path / _META}: bad world_size {world_size!r}")
    files = meta.get("files") or {}
    for r in range(world_size) if ranks is None else ranks:
        for name in (f"{_rank_stem(r)}.json", f"{_rank_stem(r)}.safetensors"):
            file = path / name
            if not file.is_file():
                raise CheckpointCorruptError(f"checkpoint file {file} is missing")
            expected = files.get(name)
            if expected is None:
                if meta.get("format") != 1:
                    raise CheckpointCorruptError(f"{path / _META} records no checksum for {name}")
                continue
            size = file.stat().st_size
            if size != expected["size"]:
                raise CheckpointCorruptError(f"checkpoint file {file} has {size} bytes, {expected['size']} were "
                                             "committed (truncated or overwritten)")
            if _sha256(file) != expected["sha256"]:
                raise CheckpointCorruptError(f"checkpoint file {file} does not match the sha256 recorded when it "
                                             "was committed (corrupted)")


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a checkpoint was saved at."""
    return int(read_meta(path)["step"])


def load_checkpoint(
    path: str | os.PathLike[str],
    rank: int,
    *,
    world_size: int | None = None,
    layout: Mapping[str, int] | None = None,
    config_hash: str | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's ``(tensors, state)`` from checkpoint directory ``path``, as given to :func:`save_checkpoint`.

    ``world_size``, ``layout`` and ``config_hash``, when given, must equal the saved ones, else
    :class:`CheckpointMismatchError` (tensor shards only fit the layout that wrote them). With ``verify`` the
    rank's files are checked first (:func:`verify_checkpoint`; :class:`CheckpointCorruptError` naming the bad
    file). Tensors are loaded with ``safetensors.torch.load_file`` onto ``device``."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") not in _READABLE_FORMATS:
        raise CheckpointMismatchError(f"{path}: checkpoint format {meta.get('format')}, expected {FORMAT_VERSION}")
    if world_size is not None and meta["world_size"] != world_size:
        raise CheckpointMismatchError(
            f"{path} was saved by {meta['world_size']} ranks, this run has {world_size}: resume with the same "
            "parallel layout"
        )
    if layout is not None and meta.get("layout") is not None and dict(layout) != meta["layout"]:
        raise CheckpointMismatchError(
            f"{path} was saved with parallel layout {meta['layout']}, this run uses {dict(layout)}"
        )
    if config_hash is not None and meta.get("config_hash") is not None and config_hash != meta["config_hash"]:
        raise CheckpointMismatchError(
            f"{path} was saved with config hash {meta['config_hash']}, this run's is {config_hash}: the model, "
            "data order or batch size changed since (see TrainerConfig.fingerprint)"
        )
    if not 0 <= rank < meta["world_size"]:
        raise ValueError(f"rank {rank} out of range for a checkpoint of {meta['world_size']} ranks")
    if verify:
        verify_checkpoint(path, [rank])
    stem = _rank_stem(rank)
    info = _read_json(path / f"{stem}.json")
    if info.get("rank") != rank or info.get("step") != meta["step"]:
        raise CheckpointMismatchError(f"{path / (stem + '.json')} belongs to rank {info.get('rank')}, step "
                                      f"{info.get('step')}, not rank {rank}, step {meta['step']}")
    tensors_path = path / f"{stem}.safetensors"
    try:
        loaded = load_file(str(tensors_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointCorruptError(f"checkpoint file {tensors_path} is unreadable ({exc})") from exc
    tensors = {k: v for k, v in loaded.items() if not k.startswith(_STATE_PREFIX)}
    state = unflatten_state(loaded, info["state"])
    return tensors, state
