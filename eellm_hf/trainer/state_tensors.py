"""Training state as safetensors tensors plus a JSON skeleton (no pickle), and the RNG states of a process.

:func:`flatten_state` turns nested dicts / lists of tensors, numbers and numpy arrays into named tensors and a
JSON-ready skeleton; :func:`unflatten_state` rebuilds the object. The optimizer and RNG helpers use it for what a
checkpoint saves per rank (see :mod:`eellm_hf.trainer.checkpoint`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

OPTIMIZER_PREFIX = "optimizer/"
"""Default key prefix of the tensors of :func:`flatten_optimizer_state`."""


# ------------------------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON)
# ------------------------------------------------------------------------------------------------------------


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``{key: tensor}`` (keys ``prefix`` + a path) and a JSON-serialisable
    skeleton referencing them. Inverse: :func:`unflatten_state`."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(obj, "", tensors, prefix)


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild what :func:`flatten_state` split (tuples, int keys, non-finite floats and arrays included)."""
    return _decode(skeleton, tensors)


def _join(path: str, part: Any) -> str:
    return f"{path}/{part}" if path else str(part)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix + path
        if key in tensors:
            raise ValueError(f"two tensors map to the checkpoint key {key!r}")
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors, prefix) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors, prefix) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, "", {}, ""), _encode(v, _join(path, k), tensors, prefix)]
                             for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path or 'the top level'!r})")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        [(tag, value)] = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise KeyError(f"checkpoint tensor {value!r} is missing")
            return tensors[value]
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
        if tag == "__ndarray__":
            return np.asarray(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        if tag == "__dtype__":
            return getattr(torch, value)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def flatten_optimizer_state(
    state_dict: Mapping[str, Any], prefix: str = OPTIMIZER_PREFIX
) -> tuple[dict[str, torch.Tensor], Any]:
    """``optimizer.state_dict()`` (torch or nanotron) → (``{prefix + path: tensor}``, JSON skeleton).

    Keys look like ``optimizer/state/3/exp_avg`` or ``optimizer/gradient_accumulator/<param name>``; merge them
    into the checkpoint's ``tensors`` and put the skeleton in its ``state``."""
    return flatten_state(dict(state_dict), prefix)


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` (extra keys in ``tensors`` are ignored); the result can go to
    ``optimizer.load_state_dict`` (which moves the state to the parameters' device and dtype)."""
    return unflatten_state(tensors, skeleton)


# ------------------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global RNG, torch's CPU RNG and (when CUDA is available) the
    current CUDA device's RNG. Store it in a checkpoint's ``state``; torch's states are uint8 tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": np.asarray(keys), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (the CUDA state goes to the current device)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(device="cpu", dtype=torch.uint8))


__all__ = [
    "OPTIMIZER_PREFIX",
    "capture_rng_state",
    "flatten_optimizer_state",
    "flatten_state",
    "restore_rng_state",
    "unflatten_optimizer_state",
    "unflatten_state",
]
