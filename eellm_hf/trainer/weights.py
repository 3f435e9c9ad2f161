"""Weights of the parallel model in Hugging Face terms: initialisation, (un)sharding, export, import.

Parameter names are ``EarlyExitGPTForCausalLM`` names, so converting is only (un)sharding, as
:data:`~.parallel_model.TP_PLAN` says (:func:`shard_tensor`): vocabulary matrices are padded to a multiple of
``tp`` rows and split on dim 0; column-parallel weights and biases split on dim 0, row-parallel weights on dim 1
(their biases live on TP rank 0 only); everything else (norms, gates) is replicated. Shapes and ties are the HF
model's (:class:`~.parallel_model.HFParameters`).

Initialisation is independent of the layout: each full tensor is drawn from a generator seeded by
``(seed, name of the tensor it is tied to)`` (:func:`_init_full_tensor`), then sharded.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .nanotron_compat import dist
from .parallel_model import HFParameters, ParallelEarlyExitGPT, as_hf_config, tp_style

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "export_hf",
    "gather_hf_state_dict",
    "init_from_hf",
    "init_hf_state_dict",
    "initialize_weights",
    "load_full_tensors",
    "read_hf_tensors",
    "shard_tensor",
]


# ------------------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------------------


def _style(name: str) -> str | None:
    """The :data:`~.parallel_model.TP_PLAN` style of the module holding HF parameter ``name``."""
    return tp_style(name.rpartition(".")[0])


def _sharded_dim(name: str) -> int | None:
    """The dim on which HF parameter ``name`` is split over TP ranks (``None``: whole on the ranks holding it)."""
    style = _style(name)
    if style == "rowwise":
        return None if name.endswith(".bias") else 1
    return 0 if style in ("vocab", "colwise") else None


def shard_tensor(full: torch.Tensor, name: str, tp_rank: int, tp_size: int, padded_vocab: int) -> torch.Tensor | None:
    """TP rank ``tp_rank``'s shard of the full HF tensor ``name`` (``None``: the rank holds no such tensor)."""
    style = _style(name)
    if style == "vocab" and padded_vocab > full.shape[0]:
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if style == "rowwise" and name.endswith(".bias"):
        return full if tp_rank == 0 else None
    dim = _sharded_dim(name)
    return full if dim is None else full.chunk(tp_size, dim=dim)[tp_rank]


# ------------------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------------------


def _init_full_tensor(parameters: HFParameters, config: Any, name: str, seed: int) -> torch.Tensor:
    """The initial value of HF parameter ``name`` (fp32), independent of any parallel layout: norms are ones,
    biases zeros, matrices ``N(0, initializer_range)`` from a generator seeded by ``(seed, tensor name)``, the name
    of the tensor ``name`` is tied to; the embedding row of ``pad_token_id`` is zero."""
    name = parameters.sources[name]
    shape = parameters.shapes[name]
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    tensor = torch.empty(shape).normal_(0.0, float(config.initializer_range), generator=generator)
    pad = config.pad_token_id
    if name == "model.embed_tokens.weight" and pad is not None and 0 <= pad < shape[0]:
        tensor[pad] = 0.0
    return tensor


def init_hf_state_dict(config: Any, seed: int) -> dict[str, torch.Tensor]:
    """The whole initial HF state dict (tied keys share one tensor); for tests and small models."""
    config = as_hf_config(config)
    parameters = HFParameters.of(config)
    tensors: dict[str, torch.Tensor] = {}
    out = {}
    for name in parameters.shapes:
        source = parameters.sources[name]
        if source not in tensors:
            tensors[source] = _init_full_tensor(parameters, config, source, seed)
        out[name] = tensors[source]
    return out


# ------------------------------------------------------------------------------------------------------------
# Loading into / gathering from the parallel model
# ------------------------------------------------------------------------------------------------------------


def _iter_shards(get: Callable[[str], torch.Tensor], model: ParallelEarlyExitGPT) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's shards of the full tensors ``get(hf_name)``, keyed by the HF names of this rank's parameters."""
    tp_pg = model.parallel_context.tp_pg
    tp_rank, tp_size = dist.get_rank(tp_pg), tp_pg.size()
    for name, param in model.hf_named_parameters().items():
        shard = shard_tensor(get(name), name, tp_rank, tp_size, model.padded_vocab)
        if shard is None or tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shard shape {None if shard is None else tuple(shard.shape)} != "
                             f"parameter shape {tuple(param.shape)}")
        yield name, shard


@torch.no_grad()
def load_full_tensors(model: ParallelEarlyExitGPT, get_full: Callable[[str], torch.Tensor]) -> None:
    """Copy into ``model`` this rank's shards of the full tensors ``get_full(hf_name)`` returns."""
    params = model.hf_named_parameters()
    for name, shard in _iter_shards(get_full, model):  # one full tensor at a time
        params[name].copy_(shard)


def initialize_weights(model: ParallelEarlyExitGPT, seed: int) -> None:
    """Layout-independent initialisation (:func:`_init_full_tensor`)."""
    parameters = model.hf_parameters
    shared = {source for name, source in parameters.sources.items() if name != source}
    cache: dict[str, torch.Tensor] = {}  # only the tensors that other parameters are tied to

    def get(name: str) -> torch.Tensor:
        source = parameters.sources[name]
        if source not in shared:
            return _init_full_tensor(parameters, model.config, source, seed)
        if source not in cache:
            cache[source] = _init_full_tensor(parameters, model.config, source, seed)
        return cache[source]

    load_full_tensors(model, get)


def _full_shape(model: ParallelEarlyExitGPT, name: str) -> tuple[int, ...]:
    shape = model.hf_parameters.shapes[name]
    return (model.padded_vocab, *shape[1:]) if _style(name) == "vocab" else shape


@torch.no_grad()
def gather_hf_state_dict(
    model: ParallelEarlyExitGPT, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor] | None:
    """The full HF state dict (CPU tensors, vocabulary padding removed) on world rank 0; ``None`` elsewhere.

    Collective over the world: every rank calls it. Each tensor comes from data-parallel rank 0 of the stage that
    holds it: TP shards are all-gathered there, then sent to rank 0.
    """
    ctx, config, layout = model.parallel_context, model.config, model.layout
    world_rank = dist.get_rank(ctx.world_pg)
    local = model.hf_named_parameters()
    param_dtype = next(model.parameters()).dtype
    stage, dp_rank = ctx.pp_rank, ctx.dp_rank
    out: dict[str, torch.Tensor] = {}
    gathered: dict[str, torch.Tensor] = {}  # by source, the key whose tensor tied keys share
    seen: set[str] = set()
    for name in model.hf_parameters.shapes:
        key = model.hf_parameters.sources[name]
        if key in seen:  # a tied alias
            if world_rank == 0:
                out[name] = gathered[key]
            continue
        seen.add(key)
        owner_stage = layout.stage_of_hf_name(key)
        owner = ctx.global_rank(pp_rank=owner_stage, dp_rank=0, tp_rank=0)
        full = None
        if stage == owner_stage and dp_rank == 0 and key in local:  # row-parallel biases: TP rank 0 only
            full = _unshard(local[key], key, model)
        if world_rank == 0 or world_rank == owner:
            if owner != 0:
                if world_rank == owner:
                    dist.send(full.contiguous(), dst=0)
                else:
                    full = torch.empty(_full_shape(model, key), dtype=param_dtype, device=ctx.device)
                    dist.recv(full, src=owner)
            if world_rank == 0:
                tensor = full.detach().cpu()
                if _style(key) == "vocab":
                    tensor = tensor[: config.vocab_size]
                gathered[key] = tensor.to(dtype) if dtype is not None else tensor.clone()
                out[name] = gathered[key]
    return out if world_rank == 0 else None


def _unshard(shard: torch.Tensor, name: str, model: ParallelEarlyExitGPT) -> torch.Tensor:
    """All-gather a parameter's TP shards within the TP group (collective there); replicated ones as they are."""
    tp_pg = model.parallel_context.tp_pg
    dim = _sharded_dim(name)
    if tp_pg.size() == 1 or dim is None:
        return shard.detach()
    pieces = [torch.empty_like(shard) for _ in range(tp_pg.size())]
    dist.all_gather(pieces, shard.detach().contiguous(), group=tp_pg)
    return torch.cat(pieces, dim=dim)


# ------------------------------------------------------------------------------------------------------------
# Hugging Face folders
# ------------------------------------------------------------------------------------------------------------


def export_hf(
    model: ParallelEarlyExitGPT,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    dtype: torch.dtype | None = None,
    generation_kwargs: dict[str, Any] | None = None,
) -> Path | None:
    """Write an ``EarlyExitGPTForCausalLM`` folder (weights without vocabulary padding, config, remote code, model
    card), the tokenizer (an object or a folder to copy) and a generation config. Collective; rank 0 writes and
    gets the path, other ranks ``None``; all ranks return after the folder is complete."""
    state = gather_hf_state_dict(model, dtype=dtype)
    ctx = model.parallel_context
    path = None
    if state is not None:
        path = _write_hf_folder(model.config, state, Path(out_dir), tokenizer, generation_kwargs or {})
    dist.barrier(group=ctx.world_pg)
    return path


def _write_hf_folder(config: Any, state: dict[str, torch.Tensor], out_dir: Path,
                     tokenizer: Any, generation_kwargs: dict[str, Any]) -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    import eellm_hf  # noqa: F401  (registers the auto classes so save_pretrained ships the remote code)
    from eellm_hf.modeling import EarlyExitGPTForCausalLM

    hf_config = as_hf_config(config)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        hf_model = EarlyExitGPTForCausalLM(hf_config)
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()
    hf_model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(str(out_dir))
    generation = GenerationConfig(
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_id=getattr(hf_config, "eos_token_id", None),
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        **generation_kwargs,
    )
    generation.save_pretrained(str(out_dir))
    return out_dir


def read_hf_tensors(hf_dir: str | Path, dtype: torch.dtype | None = torch.float32) -> Callable[[str], torch.Tensor]:
    """A ``name -> full tensor`` reader over an HF folder's safetensors files (single or sharded), loading one
    tensor at a time, in ``dtype`` (None: as stored)."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        _check_weight_files_inside(hf_dir, index, weight_map)
    elif (hf_dir / "model.safetensors").is_file():
        with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
            weight_map = {key: "model.safetensors" for key in f.keys()}
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {hf_dir}")

    def get(name: str) -> torch.Tensor:
        with safe_open(str(hf_dir / weight_map[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
            return tensor if dtype is None else tensor.to(dtype)

    get.keys = set(weight_map)  # type: ignore[attr-defined]
    return get


def _check_weight_files_inside(hf_dir: Path, index: Path, weight_map: Any) -> None:
    """Every ``weight_map`` entry must name a safetensors file inside ``hf_dir`` (no ``..``, no absolute path)."""
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: `weight_map` must be a mapping, got {type(weight_map).__name__}")
    root = hf_dir.resolve()
    for name, file in weight_map.items():
        target = (hf_dir / str(file)).resolve()
        if not isinstance(file, str) or Path(file).is_absolute() or not target.is_relative_to(root):
            raise ValueError(f"{index}: the file of {name!r}, {file!r}, is outside the model folder {hf_dir}")
        if not file.endswith(".safetensors"):
            raise ValueError(f"{index}: the file of {name!r}, {file!r}, is not a .safetensors file")


def init_from_hf(model: ParallelEarlyExitGPT, hf_dir: str | Path) -> None:
    """Load an ``EarlyExitGPTForCausalLM`` folder's weights into the parallel model (every rank reads its own
    shards). Tied keys that the folder stores once are resolved."""
    reader = read_hf_tensors(hf_dir)
    keys = reader.keys  # type: ignore[attr-defined]

    def get(name: str) -> torch.Tensor:
        for key in model.hf_parameters.aliases(name):
            if key in keys:
                return reader(key)
        raise KeyError(f"{name} is missing from {hf_dir}")

    load_full_tensors(model, get)
