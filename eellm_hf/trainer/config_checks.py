"""The checks the trainer config's dataclasses run in ``__post_init__``: a ``ValueError`` naming the bad value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["is_int", "need", "need_choice"]


def need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def need_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    need(value in choices and not isinstance(value, bool),
          f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
