"""The one place that knows about nanotron 0.4's quirks (see design notes §6).

Everything else in ``eellm_hf.trainer`` imports nanotron only through this module (or after importing it):

* importing this module fixes nanotron 0.4's circular import of ``nanotron.logging`` (once, idempotently,
  leaving no stub behind), so that the pipeline engines, tensor-parallel layers and optimizers import;
* :func:`make_parallel_context` initialises ``torch.distributed`` itself (gloo on CPU, nccl on GPU) with a
  collective timeout and returns a :class:`CompatParallelContext`, a ``nanotron.parallel.ParallelContext``
  that skips nanotron's nccl assert and ``torch.cuda.set_device`` on CPU and gives every process group it
  creates the same timeout;
* helpers pass the right device to the nanotron functions that hard-code ``"cuda"`` (``P2P``, ``build_model``,
  ``clip_grad_norm``, ``FP32GradientAccumulator``);

Rank layout (nanotron's, unchanged): world ranks are laid out as an array of shape ``(ep, pp, dp, tp)``, so
tensor parallelism is the fastest-varying coordinate, then data parallelism, then pipeline parallelism::

    world_rank = (pp_rank * dp + dp_rank) * tp + tp_rank        (expert parallelism = 1)

``ParallelContext.get_3d_ranks(world_rank)`` returns ``(pp_rank, dp_rank, tp_rank)``.

nanotron 0.4 facts that matter to callers:

* ``PipelineEngine.train_batch_iter(model, pg, batch, nb_microbatches, grad_accumulator)`` runs
  ``model(**micro_batch)``; a non-dict output ``x`` becomes ``{"loss": x}``. On the rank that holds the loss
  it divides ``output["loss"]`` by ``nb_microbatches``, registers it for backward and returns every value of
  the dict ``.detach()``-ed (values must be tensors); on other ranks the values are ``TensorPointer``s. Per
  micro-batch a stage backpropagates ``sum(activations requiring backward)``; extra per-stage losses can be
  registered with ``state.register_activation_requiring_backward`` (they are *not* divided by
  ``nb_microbatches``). The 1F1B engine needs ``nb_microbatches >= pp_size - 1``.
* ``PipelineTrainBatchState`` keeps its queues as *class* attributes shared by all instances: after an
  exception in the middle of a batch call :func:`reset_pipeline_state` before the next one.
* ``clip_grad_norm`` counts each parameter on every rank of ``mp_pg`` that holds it, except tied parameters
  (counted on the first of their ranks only): parameters replicated across TP ranks must be marked tied
  (:func:`tie_replicated_parameters`) or they are counted ``tp`` times. All parameters must be
  ``NanotronParameter`` (tying converts them).
* Tensor-parallel layers are only correct with ``async_communication=False`` (the default).
* ``build_model``'s greedy split by ``get_block_compute_costs()`` can leave the last stage empty (see
  :func:`place_pipeline_blocks` for explicit placement).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

_LOGGING_MODULE = "nanotron.logging"
_CONFIG_MODULE = "nanotron.config.config"


def fix_nanotron_circular_import() -> None:
    """Make ``import nanotron.logging`` work in nanotron 0.4 (idempotent).

    The cycle is ``nanotron.logging -> nanotron.config.config -> ... -> pipeline engine -> nanotron.logging``;
    ``nanotron.logging`` only needs ``LoggingArgs`` (for a type hint). We import it once with
    ``nanotron.config.config`` briefly replaced by a stub in ``sys.modules``, remove the stub, import the real
    ``nanotron.config`` and point ``nanotron.logging.LoggingArgs`` at the real class.
    """
    loaded = sys.modules.get(_LOGGING_MODULE)
    if loaded is not None and hasattr(loaded, "log_rank") and _CONFIG_MODULE in sys.modules:
        return
    if loaded is None:
        real_config = sys.modules.get(_CONFIG_MODULE)
        if real_config is None:
            stub = types.ModuleType(_CONFIG_MODULE)
            stub.LoggingArgs = type("LoggingArgs", (), {})  # type: ignore[attr-defined]
            sys.modules[_CONFIG_MODULE] = stub
            try:
                import nanotron.logging  # noqa: F401
            finally:
                if sys.modules.get(_CONFIG_MODULE) is stub:
                    del sys.modules[_CONFIG_MODULE]
        else:  # pragma: no cover - config already imported somehow: no cycle left
            import nanotron.logging  # noqa: F401
    import nanotron.config.config as real_config_module
    import nanotron.logging as nanotron_logging

    nanotron_logging.LoggingArgs = real_config_module.LoggingArgs


fix_nanotron_circular_import()

# ruff: noqa: E402  (the imports below need the fix above)
import nanotron.distributed as dist
from nanotron.models.base import NanotronModel, init_on_device_and_dtype
from nanotron.models.base import build_model as _nanotron_build_model
from nanotron.optim.clip_grads import clip_grad_norm as _nanotron_clip_grad_norm
from nanotron.optim.gradient_accumulator import FP32GradientAccumulator, GradientAccumulator
from nanotron.optim.inherit_from_other_optimizer import InheritFromOtherOptimizer
from nanotron.optim.named_optimizer import NamedOptimizer
from nanotron.optim.optimizer_from_gradient_accumulator import OptimizerFromGradientAccumulator
from nanotron.optim.zero import ZeroDistributedOptimizer
from nanotron.parallel.context import ParallelContext
from nanotron.parallel.data_parallel.utils import sync_gradients_across_dp
from nanotron.parallel.parameters import NanotronParameter
from nanotron.parallel.pipeline_parallel.block import PipelineBlock
from nanotron.parallel.pipeline_parallel.engine import (
    AllForwardAllBackwardPipelineEngine,
    OneForwardOneBackwardPipelineEngine,
)
from nanotron.parallel.pipeline_parallel.p2p import P2P
from nanotron.parallel.pipeline_parallel.state import (
    PipelineBatchState,
    PipelineEvalBatchState,
    PipelineTrainBatchState,
)
from nanotron.parallel.pipeline_parallel.tensor_pointer import TensorPointer
from nanotron.parallel.tensor_parallel.distributed_differentiable_primitives import differentiable_identity
from nanotron.parallel.tensor_parallel.enum import TensorParallelLinearMode
from nanotron.parallel.tensor_parallel.functional import sharded_cross_entropy
from nanotron.parallel.tensor_parallel.nn import (
    TensorParallelColumnLinear,
    TensorParallelEmbedding,
    TensorParallelRowLinear,
)
from nanotron.parallel.tied_parameters import (
    sync_tied_weights_gradients,
    tie_parameters,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "optimizer_parameter_names",
    "AllForwardAllBackwardPipelineEngine",
    "CompatParallelContext",
    "FP32GradientAccumulator",
    "NamedOptimizer",
    "NanotronModel",
    "NanotronParameter",
    "OneForwardOneBackwardPipelineEngine",
    "OptimizerFromGradientAccumulator",
    "ParallelContext",
    "PipelineBlock",
    "PipelineEvalBatchState",
    "PipelineTrainBatchState",
    "TensorParallelColumnLinear",
    "TensorParallelEmbedding",
    "TensorParallelLinearMode",
    "TensorParallelRowLinear",
    "TensorPointer",
    "ZeroDistributedOptimizer",
    "build_model",
    "clip_grad_norm",
    "create_pg_for_tied_weights",
    "default_backend",
    "device_for_backend",
    "differentiable_identity",
    "dist",
    "find_free_port",
    "init_distributed",
    "make_fp32_grad_accumulator",
    "make_p2p",
    "make_parallel_context",
    "named_params_with_correct_tied",
    "place_pipeline_blocks",
    "reset_pipeline_state",
    "sharded_cross_entropy",
    "sync_gradients_across_dp",
    "sync_tied_weights_gradients",
    "tie_parameters",
    "tie_replicated_parameters",
    "world_rank_of",
]

DEFAULT_TIMEOUT_S: float = 600.0
"""Default collective timeout (seconds) for every process group created here."""

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Backend / device
# ----------------------------------------------------------------------------------------------------


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_backend(backend: str | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` for nccl, ``cpu`` otherwise.

    Without ``backend``: the initialised process group's backend, else :func:`default_backend`.
    """
    if backend is None:
        backend = torch_dist.get_backend() if torch_dist.is_initialized() else default_backend()
    if str(backend).lower() == "nccl":
        return torch.device("cuda", _local_rank())
    return torch.device("cpu")


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Initialise the default ``torch.distributed`` process group from the ``env://`` variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (as set by ``torchrun``);
    when ``WORLD_SIZE`` is unset it sets up a single-process world on a free local port. Does nothing if
    already initialised. ``timeout_s`` bounds the rendezvous and every collective of the default group.
    Returns the backend in use.
    """
    if torch_dist.is_initialized():
        return str(torch_dist.get_backend())
    backend = backend or default_backend()
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(find_free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if backend == "nccl":
        torch.cuda.set_device(_local_rank())
    torch_dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


# ----------------------------------------------------------------------------------------------------
# Parallel context
# ----------------------------------------------------------------------------------------------------


class CompatParallelContext(ParallelContext):
    """nanotron ``ParallelContext`` that works on gloo/CPU and puts a timeout on every group it creates.

    Same attributes as nanotron's (``tp_pg``, ``pp_pg``, ``dp_pg``, ``mp_pg``, ``expert_pg``, ``world_pg``,
    ``world_rank_matrix`` of shape ``(ep, pp, dp, tp)``, ``world_ranks_to_pg``), plus ``backend``, ``device``,
    ``timeout`` and the ``tp_rank`` / ``pp_rank`` / ``dp_rank`` / ``world_rank`` properties.
    """

    def __init__(
        self,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        data_parallel_size: int,
        expert_parallel_size: int = 1,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        # Deliberately does not call ParallelContext.__init__ (nccl assert, cuda.set_device, 10 min timeouts).
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.backend = init_distributed(backend, timeout_s)
        world_size = torch_dist.get_world_size()
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("RANK", str(torch_dist.get_rank()))
        sizes = tensor_parallel_size * pipeline_parallel_size * data_parallel_size * expert_parallel_size
        if sizes != world_size:
            raise ValueError(
                f"tp({tensor_parallel_size}) * pp({pipeline_parallel_size}) * dp({data_parallel_size})"
                f" * ep({expert_parallel_size}) = {sizes} must equal the world size ({world_size})"
            )
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.data_parallel_size = data_parallel_size
        self.expert_parallel_size = expert_parallel_size
        self._groups: dict = {}
        self.set_device()
        self.device = device_for_backend(self.backend)
        self.world_pg = dist.new_group(ranks=list(range(world_size)), timeout=self.timeout)
        self._init_parallel_groups()

    def set_device(self) -> None:
        """``torch.cuda.set_device(LOCAL_RANK)`` with nccl; nothing on CPU."""
        if self.backend == "nccl":
            torch.cuda.set_device(_local_rank())

    def create_new_group(self, all_groups_ranks: Any) -> dist.ProcessGroup:
        """nanotron's version with ``self.timeout``; collective, every rank calls it in the same order."""
        torch_dist.barrier()
        rank = torch_dist.get_rank()
        containing = None
        for group_ranks in all_groups_ranks:
            sorted_ranks = tuple(sorted(int(r) for r in group_ranks))
            if sorted_ranks not in self.world_ranks_to_pg:
                self.world_ranks_to_pg[sorted_ranks] = dist.new_group(
                    ranks=[int(r) for r in group_ranks], timeout=self.timeout
                )
            if rank in sorted_ranks:
                containing = self.world_ranks_to_pg[sorted_ranks]
        torch_dist.barrier()
        return containing

    @property
    def world_rank(self) -> int:
        return dist.get_rank(self.world_pg)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_pg)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_pg)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_pg)

    def global_rank(
        self, pp_rank: int | None = None, dp_rank: int | None = None, tp_rank: int | None = None
    ) -> int:
        """World rank at the given coordinates (missing ones: this rank's)."""
        return int(
            self.world_rank_matrix[
                0,
                self.pp_rank if pp_rank is None else pp_rank,
                self.dp_rank if dp_rank is None else dp_rank,
                self.tp_rank if tp_rank is None else tp_rank,
            ]
        )


def world_rank_of(pp_rank: int, dp_rank: int, tp_rank: int, dp_size: int, tp_size: int) -> int:
    """World rank in nanotron's layout: tp fastest, then dp, then pp."""
    return (pp_rank * dp_size + dp_rank) * tp_size + tp_rank


def make_parallel_context(
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CompatParallelContext:
    """Initialise ``torch.distributed`` if needed (gloo on CPU, nccl on GPU) and build the 3D process groups.

    Collective over the whole world: every rank calls it with the same arguments. Several contexts (layouts)
    may be made in one process; they share the default group. Ranks: ``world = (pp_rank*dp + dp_rank)*tp +
    tp_rank``. A collective that waits more than ``timeout_s`` for a peer raises (gloo) instead of hanging.
    """
    return CompatParallelContext(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        data_parallel_size=dp,
        backend=backend,
        timeout_s=timeout_s,
    )


def _ctx_timeout(parallel_context: ParallelContext) -> datetime.timedelta:
    return getattr(parallel_context, "timeout", datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))


def _ctx_device(parallel_context: ParallelContext) -> torch.device:
    return getattr(parallel_context, "device", None) or device_for_backend()


# ----------------------------------------------------------------------------------------------------
# Device-correct wrappers for nanotron functions that hard-code "cuda"
# ----------------------------------------------------------------------------------------------------


def make_p2p(parallel_context: ParallelContext, device: torch.device | None = None) -> P2P:
    """``P2P`` on the pipeline group, with metadata buffers on the right device."""
    return P2P(pg=parallel_context.pp_pg, device=device or _ctx_device(parallel_context))


def build_model(
    model_builder: Callable[[], NanotronModel],
    parallel_context: ParallelContext,
    dtype: torch.dtype = torch.float32,
    target_pp_ranks: list[int] | None = None,
    device: torch.device | None = None,
) -> NanotronModel:
    """nanotron's ``build_model`` (places ``PipelineBlock``s by ``model.get_block_compute_costs()``) on the
    context's device instead of ``cuda``."""
    return _nanotron_build_model(
        model_builder=model_builder,
        parallel_context=parallel_context,
        dtype=dtype,
        target_pp_ranks=target_pp_ranks,
        device=device or _ctx_device(parallel_context),
    )


def place_pipeline_blocks(
    model: nn.Module,
    stages: Sequence[int],
    parallel_context: ParallelContext,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> None:
    """Build ``model``'s ``PipelineBlock``s (in module order) on explicit pipeline stages.

    Block ``i`` goes to stage ``stages[i]`` and is instantiated only on that stage's ranks; stages must be
    non-decreasing (nanotron assumes one contiguous run of blocks per stage). Sets ``model.input_pp_rank`` /
    ``output_pp_rank``. Use this rather than :func:`build_model`, whose greedy cost split keeps the block that
    crosses a stage's cost threshold on that stage (two equal blocks on pp=2 both land on stage 0).
    Caveat (nanotron's ``init_on_device_and_dtype``): while building, parameters, buffers and tensors from
    ``torch.empty/zeros/ones/full`` are forced to ``dtype``.
    """
    blocks = [m for m in model.modules() if isinstance(m, PipelineBlock)]
    stages = [int(s) for s in stages]
    pp_size = parallel_context.pp_pg.size()
    if len(stages) != len(blocks):
        raise ValueError(f"{len(blocks)} PipelineBlocks but {len(stages)} stages given")
    if any(s < 0 or s >= pp_size for s in stages) or any(a > b for a, b in zip(stages, stages[1:])):
        raise ValueError(f"stages must be non-decreasing values in [0, {pp_size}), got {stages}")
    with init_on_device_and_dtype(device=device or _ctx_device(parallel_context), dtype=dtype):
        for block, stage in zip(blocks, stages):
            block.build_and_set_rank(stage)
    model.input_pp_rank = stages[0]
    model.output_pp_rank = stages[-1]


def clip_grad_norm(
    mp_pg: dist.ProcessGroup,
    named_parameters: Iterable[tuple[str, NanotronParameter]],
    max_norm: float,
    grad_accumulator: GradientAccumulator | None = None,
    norm_type: float = 2.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """nanotron's ``clip_grad_norm`` (global norm over the model-parallel group, in fp32), with its empty-rank
    zero tensor on ``device`` (default: the backend's) instead of ``cuda``. Returns the unclipped norm."""
    named_parameters = list(named_parameters)
    with init_on_device_and_dtype(device=device or device_for_backend(), dtype=torch.float):
        return _nanotron_clip_grad_norm(
            mp_pg=mp_pg,
            named_parameters=named_parameters,
            max_norm=max_norm,
            grad_accumulator=grad_accumulator,
            norm_type=norm_type,
        )


def make_fp32_grad_accumulator(
    named_parameters: Iterable[tuple[str, NanotronParameter]],
    grad_buckets_named_params: Iterable[tuple[str, NanotronParameter]] | None = None,
    device: torch.device | None = None,
) -> FP32GradientAccumulator:
    """``FP32GradientAccumulator`` with its fp32 master weights and grad buffers on ``device``.

    For low-precision (bf16/fp16) parameters only (nanotron asserts they are not fp32).
    """
    with init_on_device_and_dtype(device=device or device_for_backend(), dtype=torch.float):
        return FP32GradientAccumulator(
            named_parameters=named_parameters, grad_buckets_named_params=grad_buckets_named_params
        )


def reset_pipeline_state() -> None:
    """Empty the queues nanotron's pipeline states keep as class attributes (after an aborted batch)."""
    for cls in (PipelineTrainBatchState, PipelineEvalBatchState, PipelineBatchState):
        for value in list(vars(cls).values()):
            if hasattr(value, "clear") and hasattr(value, "popleft"):
                value.clear()


# ----------------------------------------------------------------------------------------------------
# Tied parameters (nanotron's trainer.mark_tied_parameters, which cannot be imported: it pulls flash_attn)
# ----------------------------------------------------------------------------------------------------


def named_params_with_correct_tied(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters()`` with tied parameters under their tie name (nanotron's
    ``NanotronModel.get_named_params_with_correct_tied`` for any module)."""
    module_id_to_prefix = {id(module): f"{name}." for name, module in model.named_modules()}
    module_id_to_prefix[id(model)] = ""
    for name, param in model.named_parameters():
        if isinstance(param, NanotronParameter) and param.is_tied:
            yield param.get_tied_info().get_full_name_from_module_id_to_prefix(module_id_to_prefix), param
        else:
            yield name, param


def tie_replicated_parameters(
    model: nn.Module,
    parallel_context: ParallelContext,
    tp_mode: TensorParallelLinearMode = TensorParallelLinearMode.ALL_REDUCE,
) -> None:
    """Mark every parameter that is neither sharded nor already tied as tied across this rank's TP group.

    After this all parameters are ``NanotronParameter``. In ``ALL_REDUCE`` mode replicated parameters get the
    same gradient on every TP rank, so ``reduce_op=None`` (no sync, counted once by ``clip_grad_norm``); in
    ``REDUCE_SCATTER`` mode their gradients are summed. Then creates the tied groups
    (:func:`create_pg_for_tied_weights`): collective, every rank must call it.
    """
    tp_ranks = tuple(sorted(torch_dist.get_process_group_ranks(parallel_context.tp_pg)))
    reduce_op = None if tp_mode is TensorParallelLinearMode.ALL_REDUCE else dist.ReduceOp.SUM
    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, NanotronParameter) and (param.is_sharded or param.is_tied):
                continue
            if isinstance(module, TensorParallelRowLinear) and param_name == "bias":
                # Exists on TP rank 0 only.
                wrapped = param if isinstance(param, NanotronParameter) else NanotronParameter(tensor=param)
                setattr(module, param_name, wrapped)
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            tie_parameters(
                root_module=model,
                ties=[(name, tp_ranks)],
                parallel_context=parallel_context,
                reduce_op=reduce_op,
            )
    create_pg_for_tied_weights(model, parallel_context)


def create_pg_for_tied_weights(root_module: nn.Module, parallel_context: ParallelContext) -> None:
    """nanotron's ``create_pg_for_tied_weights`` with the context's timeout on the new groups (collective)."""
    group_ranks = {
        param.get_tied_info().global_ranks
        for _, param in root_module.named_parameters()
        if isinstance(param, NanotronParameter) and param.is_tied
    }
    gathered: list[Any] = [None] * parallel_context.world_pg.size()
    torch_dist.all_gather_object(gathered, group_ranks, group=parallel_context.world_pg)
    for global_ranks in sorted(set().union(*gathered)):
        if global_ranks not in parallel_context.world_ranks_to_pg:
            parallel_context.world_ranks_to_pg[global_ranks] = dist.new_group(
                ranks=list(global_ranks), timeout=_ctx_timeout(parallel_context)
            )


def optimizer_parameter_names(optimizer: Any) -> list[str]:
    """The parameter names of a nanotron optimizer stack (ZeRO, fp32 gradient accumulator, ``NamedOptimizer``
    around a torch optimizer), in the order the torch optimizer's ``state_dict`` indexes them: nanotron's
    ``NamedOptimizer.load_state_dict`` checks only the set of names, not which index is which."""
    id_to_name: dict[int, str] = {}
    inner = optimizer
    while isinstance(inner, InheritFromOtherOptimizer):
        id_to_name, inner = inner.id_to_name, inner.optimizer  # the innermost map names the torch optimizer's
    return [id_to_name[id(param)] for group in inner.param_groups for param in group["params"]]
