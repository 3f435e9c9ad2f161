"""Reading a trainer config: YAML (or a dict) → the validated dataclasses of :mod:`.config_schema`.

dacite builds each section from its mapping and checks the types the dataclasses declare; the sections then
check their values themselves. This module adds what only a file needs: unknown keys (with a "did you mean"),
the section a key is in (``train.lr``), paths relative to the YAML file, and the built-in corpora.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import dacite
import yaml

from .config_schema import (
    BpeTokenizerSpec,
    CheckpointConfig,
    DataConfig,
    ModelSection,
    ParallelismConfig,
    TrainConfig,
    TrainerConfig,
)

_TOP_LEVEL = ("model", "parallelism", "data", "train", "checkpoint", "run_dir", "export_hf", "export_generation")
_EXTRA_MODEL_KEYS = ("rope_theta", "rope_scaling")  # accepted by EarlyExitGPTConfig, folded into rope_parameters


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` (exponent without a dot) as a float, as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    world_size: int | None = None,
    *,
    check_files: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
) -> TrainerConfig:
    """Read and validate a trainer config (a YAML file or an already-parsed dict).

    ``world_size``: the number of processes (``tp * pp * dp`` must match); None skips that check.
    ``check_files``: check that data files, the tokenizer and ``init_from`` exist (False only for configs
    validated away from their data, e.g. GPU configs in tests). ``base_dir``: the directory relative paths of
    a dict are resolved against (default: current directory; a YAML file's own directory otherwise).
    """
    raw, source, base = _read(path_or_dict, base_dir)
    raw = _check_keys("config", raw, _TOP_LEVEL)
    for key in ("model", "data", "train", "run_dir"):
        if raw.get(key) is None:
            raise ValueError(f"missing required section `{key}`")

    model = _parse_model(raw["model"], base)
    parallelism = _build(ParallelismConfig, "parallelism", raw.get("parallelism"), base)
    if world_size is not None:
        parallelism.check_world_size(world_size)
    run_dir = _resolve("run_dir", raw["run_dir"], base)
    data = _parse_data(raw["data"], base, run_dir, default_tokenizer=_model_tokenizer(model, run_dir))
    train = _build(TrainConfig, "train", raw["train"], base)
    checkpoint = None
    if raw.get("checkpoint") is not None:
        checkpoint = _build(CheckpointConfig, "checkpoint", raw["checkpoint"], base)
    cfg = TrainerConfig(
        model=model,
        parallelism=parallelism,
        data=data,
        train=train,
        run_dir=run_dir,
        checkpoint=checkpoint,
        export_hf=None if raw.get("export_hf") is None else _resolve("export_hf", raw["export_hf"], base),
        export_generation=_check_mapping("export_generation", raw.get("export_generation") or {}),
        source=source,
    )
    if check_files:
        cfg.check_files()
    return cfg


def _read(path_or_dict: Any, base_dir: Any) -> tuple[Any, Path | None, Path]:
    """The raw mapping, the YAML file it came from (None for a dict), and the folder relative paths start from."""
    if isinstance(path_or_dict, Mapping):
        base = Path(base_dir if base_dir is not None else os.getcwd()).expanduser().resolve()
        return dict(path_or_dict), None, base
    source = Path(path_or_dict).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"config file not found: {source}")
    with open(source, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else source.parent
    return raw, source, base


# ------------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------------


def _parse_model(section: Any, base: Path) -> ModelSection:
    from eellm_hf.modeling.configuration_early_exit_gpt import EarlyExitGPTConfig
    from eellm_hf.modeling.sources import BUNDLED_MODELS

    allowed = [*EarlyExitGPTConfig.__annotations__, *_EXTRA_MODEL_KEYS, "init_from", "exit_vocab_size"]
    fields = _check_keys("model", section, allowed)
    init_from = fields.pop("init_from", None)
    if init_from is not None and not (isinstance(init_from, str) and init_from in BUNDLED_MODELS):
        init_from = _resolve("model.init_from", init_from, base)
    return ModelSection(fields=fields, init_from=init_from, exit_vocab_size=fields.pop("exit_vocab_size", None))


def _model_tokenizer(model: ModelSection, run_dir: Path) -> Path | None:
    """The default ``data.tokenizer``: the ``init_from`` checkpoint's own (its converted folder's), if any."""
    from .init_model import converted_dir

    if model.init_from is None:
        return None
    return converted_dir(run_dir) if model.converts else Path(model.init_from)


def _builtin_files(files: Any, run_dir: Path) -> tuple[Any, dict[str, str]]:
    """``data.files`` with each ``builtin:NAME`` replaced by the run's file of that corpus, and those files."""
    from .data import BUILTIN_CORPORA, BUILTIN_PREFIX, builtin_corpus_file

    if not isinstance(files, list):
        return files, {}
    resolved, builtins = [], {}
    for entry in files:
        if isinstance(entry, str) and entry.startswith(BUILTIN_PREFIX):
            name = entry[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_CORPORA:
                raise ValueError(f"`data.files` entry {entry!r}: unknown built-in corpus, choose from "
                                 f"{', '.join(BUILTIN_CORPORA)}")
            entry = str(builtin_corpus_file(run_dir, name))
            builtins[entry] = name
        resolved.append(entry)
    return resolved, builtins


def _parse_data(section: Any, base: Path, run_dir: Path, default_tokenizer: Path | None = None) -> DataConfig:
    section = _check_keys("data", section, [f.name for f in dataclasses.fields(DataConfig)
                                            if f.name not in ("train_bpe", "builtin_files")])
    section["files"], builtins = _builtin_files(section.get("files"), run_dir)
    tokenizer = section.pop("tokenizer", None)
    if tokenizer is None:
        if default_tokenizer is None:
            raise ValueError("missing required key `data.tokenizer` (it defaults to model.init_from's tokenizer "
                             "only when model.init_from is set)")
        tokenizer = default_tokenizer
    spec = None
    if isinstance(tokenizer, Mapping):
        spec_raw = _check_keys("data.tokenizer", tokenizer, ["train_bpe"])
        if "train_bpe" not in spec_raw:
            raise ValueError("`data.tokenizer` must be a folder or {train_bpe: {vocab_size, out_dir}}")
        spec = _build(BpeTokenizerSpec, "data.tokenizer.train_bpe", spec_raw["train_bpe"], base)
        tokenizer = spec.out_dir
    return _build(DataConfig, "data", {**section, "tokenizer": str(tokenizer)}, base,
                  train_bpe=spec, builtin_files=builtins)


# ------------------------------------------------------------------------------------------------------------
# Generic: keys, types (dacite), paths
# ------------------------------------------------------------------------------------------------------------


def _check_keys(where: str, mapping: Any, allowed: Sequence[str]) -> dict[str, Any]:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"`{where}` must be a mapping, got {type(mapping).__name__}: {mapping!r}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"unknown key `{where}.{key}`{hint}; allowed: {', '.join(sorted(allowed))}")
    return dict(mapping)


def _check_mapping(where: str, mapping: Any) -> dict[str, Any]:
    """``mapping`` as a dict; its keys are checked by the section itself."""
    return _check_keys(where, mapping, list(mapping) if isinstance(mapping, Mapping) else [])


def _build(cls: type, where: str, mapping: Any, base_dir: Path, **given: Any) -> Any:
    """Section ``cls`` at ``where`` from ``mapping`` (nested sections included) with dacite, plus the ``given``
    fields already built; errors name the key."""
    values = _check_section_keys(cls, where, mapping, skip=tuple(given))
    hooks = {
        Path: lambda value: _as_path(value, base_dir),
        list[Path]: _as_list(list[Path]),
        list[int]: _as_list(list[int]),
        float: _as_float,
        int: _as_int,
    }
    try:
        return dacite.from_dict(cls, {**values, **given}, config=dacite.Config(type_hooks=hooks, strict=True))
    except dacite.MissingValueError as exc:
        raise ValueError(f"missing required key `{where}.{exc.field_path}`") from None
    except dacite.WrongTypeError as exc:
        raise ValueError(f"`{where}.{exc.field_path}` {_type_message(exc.field_type, exc.value)}") from None


def _check_section_keys(cls: type, where: str, mapping: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """``mapping`` with only ``cls``'s fields (``skip`` excluded), nested sections checked the same way."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.init]
    values = _check_keys(where, mapping, fields)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        nested = [t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)]
        if nested and value is not None:
            values[name] = _check_section_keys(nested[0], f"{where}.{name}", value)
    return values


def _as_path(value: Any, base_dir: Path) -> Any:
    if isinstance(value, (str, os.PathLike)) and str(value):
        return _resolve("", value, base_dir)
    raise dacite.WrongTypeError(field_type=Path, value=value)


def _as_list(hint: Any) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise dacite.WrongTypeError(field_type=hint, value=value)
        return list(value)

    return check


def _as_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise dacite.WrongTypeError(field_type=float, value=value)
    return float(value)


def _as_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise dacite.WrongTypeError(field_type=int, value=value)
    return value


def _type_message(hint: Any, value: Any) -> str:
    """What a value of type ``hint`` must be, as today's messages say it (``must be an integer, got 2.5``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 2 and bool in inner:  # `bool | Literal[...]`, e.g. checkpoint.resume: true|false|auto
            (choices,) = [typing.get_args(a) for a in inner if a is not bool]
            return f"must be true, false or {', '.join(map(str, choices))}; got {value!r}"
        return _type_message(inner[0], value) if len(inner) == 1 else f"has the wrong type: {value!r}"
    if origin is Literal:
        return f"must be one of {', '.join(map(str, args))}; got {value!r}"
    if origin is list:
        return f"must be a list, got {value!r}" if not isinstance(value, (list, tuple)) else \
            f"entries {_type_message(args[0], value)}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path",
             dict: "a mapping"}
    return f"must be {names.get(hint, getattr(hint, '__name__', str(hint)))}, got {value!r}"


def _resolve(name: str, value: Any, base_dir: Path) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"`{name}` must be a path, got {value!r}")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


__all__ = ["load_config"]
