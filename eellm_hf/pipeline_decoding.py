"""Pipeline-parallel early-exit decoding (EE-LLM's second inference method).

    torchrun --nproc-per-node P -m eellm_hf.generate_cli MODEL_DIR --pp P --prompt TEXT --early-exit-threshold T

or, on every rank of a `torch.distributed` job (one rank per pipeline stage)::

    pipeline = PipelineEarlyExitGPT.from_pretrained(model_dir, pp=P)
    if pipeline.is_first:
        output = pipeline.generate(**encoded, early_exit_threshold=0.8, max_new_tokens=32)   # any number of calls
        pipeline.close()
    else:
        pipeline.serve()                                                      # until rank 0 closes

The model is split by layers as the trainer splits it (`trainer.parallel_model.make_layout`): stage 0 holds the
embedding, every stage its decoder layers and the exits after them (block, norm, MLP, head), the last stage the
final norm and head. Each rank builds the HF model on the meta device, materialises only its own modules and
reads only their tensors from the safetensors files (one `safe_open` per tensor, through the `weight_map` of
the index when the weights are sharded).

Rank 0 runs transformers' `generate` (logits processors, sampling, stopping criteria: everything but the model)
with a decoding state that drives the pipeline. Per generated token:

* stage 0 embeds it and runs its layers. Every stage runs all of its layers for every token, so each stage's KV is
  complete when the next token arrives: the KV-recomputation backlog of single-process decoding never forms;
* at each active exit, the rows not yet decided evaluate the exit's head; a row whose confidence reaches the
  threshold is decided there. A stage reports to rank 0 as soon as every row it received undecided is decided,
  or after its last active exit, before it runs its remaining layers;
* rank 0 takes the decisions in depth order (its own exits, then stage 1's, ...), picks the tokens and starts them
  at once, while the later stages still compute the previous token's remaining layers (filling its KV).

The decisions are those of single-process generation (`generation_early_exit`): same exits, confidences and
logits, hence the same tokens for greedy search and, with rank 0's random generator, for sampling.

Messages (point-to-point on the default process group, whose timeout bounds every wait, so that a dead or hung
rank makes the others raise instead of hanging; neighbouring stages' messages stay in order):

* stage s -> s + 1, per step: a float64 header `[kind, rows, start, end, batch, capacity, threshold, confidence,
  active flag per exit]`; one int64 tensor of the row indices, their undecided flags, their positions
  `(rows, end - start)` and, at prefill, the prompt's key mask `(batch, prompt length)`; then the hidden states
  `(rows, end - start, hidden_size)`. Kind STOP ends the service loop.
* stage s -> rank 0, per step in which rows arrive undecided at a stage that can decide (an active exit, or the
  last stage): the `(undecided rows,)` int64 layer that decided each (0: not here), then the decided rows' raw
  logits `(decided, vocab)` in the confidence dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .modeling import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
from .modeling.early_exit_decoder import (
    ExitDecision,
    KVWriter,
    causal_padding_mask,
    decide_exit,
    gather_decisions,
    prompt_mask_and_positions,
    rotary_embeddings,
)
from .modeling.early_exit_settings import EXIT_CONFIDENCE_MEASURES, EarlyExitSettings, EarlyExitStats
from .modeling.generation_early_exit import generate_with_decoder
from .trainer.nanotron_compat import DEFAULT_TIMEOUT_S, device_for_backend, init_distributed
from .trainer.parallel_model import StageLayout, make_layout
from .trainer.weights import read_hf_tensors

__all__ = ["PipelineEarlyExitGPT", "PipelineStage", "load_stage_model"]

STOP, PREFILL, DECODE = 0, 1, 2
# a step's header: kind, rows, start, end, batch size, capacity, threshold, measure, gate threshold; then one flag
# per exit (active or not)
_HEADER = 9
_GENERATE_ARGUMENTS = ("generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                       "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                       "negative_prompt_attention_mask", "custom_generate")


# ------------------------------------------------------------------------------------------------ weights


def stage_parameter_names(model: nn.Module, layout: StageLayout, stage: int) -> list[str]:
    """The HF parameter names stage `stage` needs: its own (`StageLayout.stage_of_hf_name`), plus the final head
    when its exits project with it (`tie_exit_heads`)."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)
             if layout.stage_of_hf_name(name) == stage]
    has_exit = any(layout.stage_of_exit(j) == stage for j in range(len(layout.exit_layers)))
    if model.config.tie_exit_heads and has_exit and "lm_head.weight" not in names:
        names.append("lm_head.weight")
    return names


def load_stage_model(
    model_dir: str | Path, layout: StageLayout, stage: int, dtype: torch.dtype, device: torch.device
) -> tuple[EarlyExitGPTForCausalLM, list[str]]:
    """`EarlyExitGPTForCausalLM` built on the meta device with only stage `stage`'s modules materialised on
    `device`; returns it and the tensor names it read from the safetensors files."""
    model_dir = Path(model_dir)
    config = EarlyExitGPTConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = EarlyExitGPTForCausalLM(config)
    read = read_hf_tensors(model_dir, dtype=None)  # one `safe_open` per tensor read, through the index if sharded
    wanted: dict[str, str] = {}
    for name in stage_parameter_names(model, layout, stage):
        key = name
        if key not in read.keys and name == "lm_head.weight" and config.tie_word_embeddings:
            key = "model.embed_tokens.weight"  # tied: saved once, under the embedding's name
        if key not in read.keys:
            raise KeyError(f"tensor {key!r} (stage {stage}) is not in the safetensors files of {model_dir}")
        wanted[name] = key
    loaded = {key: nn.Parameter(read(key).to(device=device, dtype=dtype), requires_grad=False)
              for key in sorted(set(wanted.values()))}
    for name, key in wanted.items():
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, loaded[key])
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the model config's defaults, as `from_pretrained` does
        model.generation_config = GenerationConfig.from_model_config(config)
    return model.eval(), sorted(loaded)


# ------------------------------------------------------------------------------------------------ one stage


class PipelineStage:
    """One rank's layers and exits of an `EarlyExitGPTForCausalLM` (the rest on the meta device), and their KV."""

    def __init__(self, model: EarlyExitGPTForCausalLM, layout: StageLayout, stage: int, device: torch.device):
        config = model.config
        self.model, self.backbone, self.config, self.layout = model, model.model, config, layout
        self.stage, self.device = stage, device
        self.is_first, self.is_last = stage == 0, stage == layout.last_stage
        first_layer = sum(layout.layer_split[:stage])
        self.layer_indices = range(first_layer, first_layer + layout.layer_split[stage])
        self.exit_indices = [j for j in range(config.num_exits) if layout.stage_of_exit(j) == stage]
        self.num_layers = config.num_hidden_layers
        self.dtype = next(p for p in model.parameters() if p.device.type != "meta").dtype
        self.confidence_dtype = torch.promote_types(self.dtype, torch.float32)
        self.settings = EarlyExitSettings()
        self.writer: KVWriter | None = None

    def decides(self, settings: EarlyExitSettings) -> bool:
        """Whether this stage can decide a token under `settings` (an active exit here, or the final head)."""
        return self.is_last or any(j in self.exit_indices for j in settings.active_exits)

    def start_generation(
        self, settings: EarlyExitSettings, batch_size: int, capacity: int, prompt_key_mask: torch.Tensor
    ) -> None:
        """New KV buffers for `batch_size` rows of `capacity` columns, and the prompt's key mask."""
        self.settings = settings
        self.exit_after = {self.config.exit_layers[j] - 1: j for j in settings.active_exits if j in self.exit_indices}
        self.last_exit_layer = max(self.exit_after, default=None)
        prompt_length = prompt_key_mask.shape[1]
        self.key_mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.key_mask[:, :prompt_length] = prompt_key_mask
        self.row_padded = (~prompt_key_mask).any(dim=-1).tolist()
        cache_layers = list(self.layer_indices) + [self.num_layers + j for j in self.exit_after.values()
                                                   if self.config.exit_block]
        kv_shape = (batch_size, self.config.num_key_value_heads, capacity, self.config.head_dim)
        keys: list[torch.Tensor | None] = [None] * (self.num_layers + self.config.num_exits)
        values = list(keys)
        for layer in cache_layers:
            keys[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
            values[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.cache_layers, self.capacity = cache_layers, capacity
        self.writer = KVWriter(keys, values)

    def run(
        self,
        rows: list[int],
        start: int,
        end: int,
        positions: torch.Tensor,
        inputs: torch.Tensor,
        undecided: list[bool],
        report: Any,
    ) -> tuple[torch.Tensor, list[bool]]:
        """Columns `start:end` of `rows` through this stage's layers (KV written), deciding the undecided rows'
        next tokens (from column `end - 1`) at the active exits and, on the last stage, the final head.

        `inputs`: token ids on the first stage, else the previous stage's hidden states. `report(groups)` is called
        once, as soon as this stage's decisions are known, if it can decide and some rows arrived undecided;
        `groups` are `(indices into rows, layer, logits)`. Returns the hidden states and the rows still undecided.
        """
        if end > self.capacity:
            self._grow(end)
        writer = self.writer
        writer.rows = _selector(rows, self.device)
        writer.start, writer.end, writer.valid = start, end, None
        mask = None
        if end - start > 1 or any(self.row_padded[row] for row in rows):
            mask = causal_padding_mask(self.key_mask[writer.rows, :end], start, self.dtype)
        layer_kwargs = {"attention_mask": mask,
                        "position_embeddings": rotary_embeddings(self.backbone.rotary_emb, positions, self.dtype)}
        x = self.backbone.embed_tokens(inputs) if self.is_first else inputs
        pending = [index for index, flag in enumerate(undecided) if flag]
        reporting = bool(pending) and self.decides(self.settings)
        groups: list[tuple[list[int], int, torch.Tensor]] = []
        for layer_idx in self.layer_indices:
            x = self.backbone.layers[layer_idx](x, cache=writer, use_cache=True, **layer_kwargs)
            exit_index = self.exit_after.get(layer_idx)
            if exit_index is None:
                continue
            exit_module = self.backbone.exits[exit_index]
            y = exit_module.block(x, cache=writer, use_cache=True, **layer_kwargs) if hasattr(exit_module, "block") \
                else x
            if not reporting:
                continue
            fired, logits = decide_exit(self.model, exit_module, exit_index, y[pending, -1], self.settings,
                                        self.confidence_dtype)
            if fired:
                groups.append(([pending[i] for i in fired], self.config.exit_layers[exit_index], logits))
                leaving = set(fired)
                pending = [index for position, index in enumerate(pending) if position not in leaving]
            if not pending or (layer_idx == self.last_exit_layer and not self.is_last):
                report(groups)
                reporting = False
        if reporting:  # the last stage: the final head decides the rest
            logits = self.model.lm_head(self.backbone.norm(x[pending, -1]))
            groups.append((pending, self.num_layers, logits))
            pending = []
            report(groups)
        still = set(pending)
        return x, [index in still for index in range(len(rows))]

    def _grow(self, needed: int) -> None:
        """Enlarge the KV buffers and key mask along the sequence (only when generation runs past max_length)."""
        extra = max(needed, 2 * self.capacity) - self.capacity
        for buffers in (self.writer.keys, self.writer.values):
            for layer in self.cache_layers:
                buffers[layer] = torch.cat([buffers[layer], buffers[layer].new_zeros(
                    *buffers[layer].shape[:2], extra, buffers[layer].shape[3])], dim=2)
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(self.key_mask.shape[0], extra)], dim=1)
        self.capacity += extra


def _selector(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of `rows` in the batch dimension: a slice (views, no copies) when they are contiguous."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


# ------------------------------------------------------------------------------------------------ the pipeline


@dataclasses.dataclass
class _Step:
    """One step's work as it travels down the pipeline."""

    kind: int
    rows: list[int]
    start: int
    end: int
    positions: torch.Tensor
    undecided: list[bool]
    settings: EarlyExitSettings
    batch_size: int = 0
    capacity: int = 0
    key_mask: torch.Tensor | None = None  # the prompt's, at prefill


class PipelineEarlyExitGPT:
    """An `EarlyExitGPTForCausalLM` split over the ranks of the default process group, one pipeline stage each.

    Rank 0 calls `generate` (transformers' arguments plus the early-exit settings, as
    `EarlyExitGPTForCausalLM.generate`) and finally `close`; the other ranks call `serve`, which returns when rank 0
    closes. `with pipeline:` does the closing (rank 0) or serving (other ranks) on leaving the block.
    """

    def __init__(self, model: EarlyExitGPTForCausalLM, layout: StageLayout, stage: int, device: torch.device,
                 loaded_tensors: list[str]):
        self.model, self.layout, self.device = model, layout, device
        self.stage = PipelineStage(model, layout, stage, device)
        self.loaded_tensors = loaded_tensors
        self.config = model.config
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._broken: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        pp: int | None = None,
        layer_split: list[int] | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> PipelineEarlyExitGPT:
        """Join (or initialise, from torchrun's environment) the default process group, whose size must be `pp`,
        and load this rank's stage. `timeout_s` bounds every wait for another rank."""
        backend = init_distributed(backend, timeout_s)
        world_size, rank = torch_dist.get_world_size(), torch_dist.get_rank()
        if pp is not None and pp != world_size:
            raise ValueError(f"--pp {pp} needs {pp} processes (torchrun --nproc-per-node {pp}), got {world_size}")
        config = EarlyExitGPTConfig.from_pretrained(model_dir)
        layout = make_layout(config, world_size, layer_split)
        device = device_for_backend(backend)
        model, loaded = load_stage_model(model_dir, layout, rank, dtype, device)
        return cls(model, layout, rank, device, loaded)

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    # -- rank 0 ------------------------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """`EarlyExitGPTForCausalLM.generate` over the pipeline (rank 0 only). The returned cache is None: the KV
        stays on the stages. A threshold of None decodes at full depth through the same pipeline."""
        if not self.is_first:
            raise RuntimeError(f"generate runs on rank 0; rank {self.stage.stage} serves its stage (call serve())")
        if self._broken:
            raise RuntimeError(f"the pipeline is out of step after an error in an earlier call: {self._broken}")
        base_arguments = {name: kwargs.pop(name, None) for name in _GENERATE_ARGUMENTS}
        base_arguments["inputs"] = inputs
        decoder = functools.partial(_FirstStageDecoder, self)
        base_generate = functools.partial(GenerationMixin.generate, self.model)
        output = generate_with_decoder(self.model, base_generate, base_arguments, kwargs, decoder,
                                       full_depth_with_transformers=False)
        if hasattr(output, "cache"):
            output.cache = None
        return output

    def close(self) -> None:
        """End the other ranks' `serve` loops (rank 0), then wait for every rank."""
        self._send_header(STOP)
        self._finish()

    def _first_step(self, step: _Step, token_ids: torch.Tensor) -> list[ExitDecision]:
        """Run a step on stage 0, hand it down the pipeline and collect every row's decision in depth order."""
        decisions: list[ExitDecision] = []
        rows = step.rows

        def keep(groups: list[tuple[list[int], int, torch.Tensor]]) -> None:
            for indices, layer, logits in groups:
                decisions.append(ExitDecision([rows[i] for i in indices], layer, logits))

        try:
            hidden, undecided = self.stage.run(rows, step.start, step.end, step.positions, token_ids, step.undecided,
                                               keep)
            if self.num_stages > 1:
                self._send_step(dataclasses.replace(step, undecided=undecided), hidden)
            for stage in range(1, self.num_stages):
                pending = [index for index, flag in enumerate(undecided) if flag]
                if not pending:
                    break
                if not self._stage_decides(stage, step.settings):
                    continue
                decisions += self._receive_decisions(stage, [rows[i] for i in pending])
                decided = {row for decision in decisions for row in decision.rows}
                undecided = [row not in decided for row in rows]
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        return decisions

    def _stage_decides(self, stage: int, settings: EarlyExitSettings) -> bool:
        if stage == self.layout.last_stage:
            return True
        return any(self.layout.stage_of_exit(j) == stage for j in settings.active_exits)

    def _receive_decisions(self, stage: int, rows: list[int]) -> list[ExitDecision]:
        layers = torch.empty(len(rows), dtype=torch.long, device=self.device)
        torch_dist.recv(layers, src=stage)
        layers = layers.tolist()
        fired = [index for index, layer in enumerate(layers) if layer > 0]
        if not fired:
            return []
        logits = torch.empty(len(fired), self.config.vocab_size, dtype=self.stage.confidence_dtype,
                             device=self.device)
        torch_dist.recv(logits, src=stage)
        decisions = []
        for layer in sorted({layers[i] for i in fired}):
            positions = [k for k, i in enumerate(fired) if layers[i] == layer]
            decisions.append(ExitDecision([rows[fired[k]] for k in positions], layer, logits[positions]))
        return decisions

    # -- ranks 1.. -----------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run this stage's part of every step rank 0 starts, until it closes (ranks other than 0)."""
        if self.is_first:
            raise RuntimeError("rank 0 drives the pipeline: call generate() and close(), not serve()")
        with self.model.reusing_exit_shortlists():
            self._serve_steps()
        self._finish()

    def _serve_steps(self) -> None:
        stage = self.stage
        while True:
            step, hidden = self._receive_step()
            if step.kind == STOP:
                if not stage.is_last:
                    self._send_header(STOP)
                break
            if step.kind == PREFILL:
                stage.start_generation(step.settings, step.batch_size, step.capacity, step.key_mask)
            arrived_undecided = [index for index, flag in enumerate(step.undecided) if flag]
            report = functools.partial(self._send_decisions, arrived_undecided)
            hidden, undecided = stage.run(step.rows, step.start, step.end, step.positions, hidden, step.undecided,
                                          report)
            if not stage.is_last:
                self._send_step(dataclasses.replace(step, undecided=undecided), hidden)

    def _send_decisions(self, step_undecided: list[int], groups: list[tuple[list[int], int, torch.Tensor]]) -> None:
        """To rank 0: the layer that decided each row that arrived undecided (`step_undecided`, indices into the
        step's rows; 0: not decided here), then the decided rows' logits in that order."""
        layer_of = {}
        for indices, layer, _ in groups:
            for index in indices:
                layer_of[index] = layer
        layers = torch.tensor([layer_of.get(index, 0) for index in step_undecided], dtype=torch.long,
                              device=self.device)
        self._isend(layers, 0)
        if layer_of:
            order = {index: position for position, index in enumerate(step_undecided)}
            rows = sorted(layer_of, key=order.__getitem__)
            by_row = {}
            for indices, _, logits in groups:
                for position, index in enumerate(indices):
                    by_row[index] = logits[position]
            logits = torch.stack([by_row[index] for index in rows]).to(self.stage.confidence_dtype)
            self._isend(logits.contiguous(), 0)

    # -- messages ------------------------------------------------------------------------------------------------

    def __enter__(self) -> PipelineEarlyExitGPT:
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is not None and (self._broken or not self.is_first):
            return  # out of step (or never served): let the error end this process; the peers see it go
        if self.is_first:
            self.close()
        else:
            self.serve()

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        self._sends = [(work, kept) for work, kept in self._sends if not work.is_completed()]
        self._sends.append((torch_dist.isend(tensor, dst=dst), tensor))

    def _finish(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []
        torch_dist.barrier()

    def _send_header(self, kind: int, step: _Step | None = None) -> None:
        header = torch.zeros(_HEADER + self.config.num_exits, dtype=torch.float64, device=self.device)
        header[0] = kind
        if step is not None:
            settings = step.settings
            header[1:_HEADER] = torch.tensor([
                len(step.rows), step.start, step.end, step.batch_size, step.capacity,
                -1.0 if settings.threshold is None else settings.threshold,
                EXIT_CONFIDENCE_MEASURES.index(settings.confidence),
                -1.0 if settings.gate_threshold is None else settings.gate_threshold,
            ], dtype=torch.float64)
            for j in settings.active_exits:
                header[_HEADER + j] = 1
        self._isend(header, self.stage.stage + 1)

    def _send_step(self, step: _Step, hidden: torch.Tensor) -> None:
        """Header, then one int64 tensor of rows, undecided flags, positions (and the prompt's key mask at
        prefill), then the hidden states: three messages per hop and step."""
        dst = self.stage.stage + 1
        self._send_header(step.kind, step)
        parts = [torch.tensor(step.rows, dtype=torch.long, device=self.device),
                 torch.tensor([int(flag) for flag in step.undecided], dtype=torch.long, device=self.device),
                 step.positions.to(torch.long).flatten()]
        if step.kind == PREFILL:
            parts.append(step.key_mask.to(torch.long).flatten())
        self._isend(torch.cat(parts), dst)
        self._isend(hidden.contiguous(), dst)

    def _receive_step(self) -> tuple[_Step, torch.Tensor | None]:
        src = self.stage.stage - 1
        header = torch.empty(_HEADER + self.config.num_exits, dtype=torch.float64, device=self.device)
        torch_dist.recv(header, src=src)
        values = header.tolist()
        kind = int(values[0])
        if kind == STOP:
            return _Step(STOP, [], 0, 0, header, [], EarlyExitSettings()), None
        num_rows, start, end, batch_size, capacity = (int(v) for v in values[1:6])
        threshold = None if values[6] < 0 else values[6]
        active = tuple(j for j in range(self.config.num_exits) if values[_HEADER + j] > 0)
        settings = EarlyExitSettings(threshold=threshold, confidence=EXIT_CONFIDENCE_MEASURES[int(values[7])],
                                     gate_threshold=None if values[8] < 0 else values[8], active_exits=active)
        columns = end - start
        sizes = [num_rows, num_rows, num_rows * columns] + ([batch_size * end] if kind == PREFILL else [])
        control = torch.empty(sum(sizes), dtype=torch.long, device=self.device)
        torch_dist.recv(control, src=src)
        pieces = control.split(sizes)
        rows, flags = pieces[0].tolist(), pieces[1].tolist()
        positions = pieces[2].view(num_rows, columns)
        key_mask = pieces[3].view(batch_size, end).bool() if kind == PREFILL else None
        hidden = torch.empty(num_rows, columns, self.config.hidden_size, dtype=self.stage.dtype, device=self.device)
        torch_dist.recv(hidden, src=src)
        step = _Step(kind, rows, start, end, positions, [bool(flag) for flag in flags], settings, batch_size,
                     capacity, key_mask)
        return step, hidden


class _FirstStageDecoder:
    """The decoding state `generate_with_decoder` drives on rank 0 (`EarlyExitDecoder`'s interface): the token ids,
    with the model run by the pipeline."""

    def __init__(self, pipeline: PipelineEarlyExitGPT, model: nn.Module, settings: EarlyExitSettings,
                 input_ids: torch.LongTensor, max_length: int):
        self.pipeline, self.settings, self.config = pipeline, settings, model.config
        batch_size, prompt_length = input_ids.shape
        self.batch_size, self.prompt_length, self.device = batch_size, prompt_length, input_ids.device
        self.capacity = max(int(max_length), prompt_length + 1)
        self.ids = input_ids.new_zeros(batch_size, self.capacity)
        self.ids[:, :prompt_length] = input_ids
        self.positions = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=self.device)
        exit_layers = model.config.exit_layers
        exit_report = tuple(exit_layers[j] for j in settings.active_exits) + (model.config.num_hidden_layers,)
        self.stats = EarlyExitStats(exit_layers=exit_report, tokens_per_exit=dict.fromkeys(exit_report, 0),
                                    exit_block_tokens=[0] * len(exit_layers), exit_head_tokens=[0] * len(exit_layers))

    def prefill(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Any
                ) -> list[ExitDecision]:
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("Pipeline decoding starts from the prompt: it cannot continue a cache.")
        length, rows = self.prompt_length, list(range(self.batch_size))
        key_mask, positions = prompt_mask_and_positions(attention_mask, position_ids, self.batch_size, length,
                                                        self.device)
        self.positions[:, :length] = positions
        self.stats.prefill_tokens = self.batch_size * length
        self.pipeline.stage.start_generation(self.settings, self.batch_size, self.capacity, key_mask)
        step = _Step(PREFILL, rows, 0, length, self.positions[:, :length], [True] * len(rows), self.settings,
                     self.batch_size, self.capacity, key_mask)
        return self.pipeline._first_step(step, self.ids[:, :length])

    def step(self, rows: list[int], column: int) -> list[ExitDecision]:
        index = torch.tensor(rows, device=self.device)
        step = _Step(DECODE, rows, column, column + 1, self.positions[index, column:column + 1], [True] * len(rows),
                     self.settings)
        return self.pipeline._first_step(step, self.ids[index, column:column + 1])

    def append(self, tokens: torch.LongTensor, column: int) -> None:
        if column >= self.capacity:
            extra = self.capacity
            self.ids = torch.cat([self.ids, self.ids.new_zeros(self.batch_size, extra)], dim=1)
            self.positions = torch.cat([self.positions, self.positions.new_zeros(self.batch_size, extra)], dim=1)
            self.capacity += extra
        self.ids[:, column] = tokens
        self.positions[:, column] = self.positions[:, column - 1] + 1

    def gather_logits(self, decisions: list[ExitDecision]) -> tuple[torch.Tensor, list[int]]:
        return gather_decisions(decisions, self.stats, self.batch_size, self.config.vocab_size,
                                self.pipeline.stage.confidence_dtype, self.device)

    def write_cache(self, cache: Any, length: int) -> None:
        if getattr(cache, "_is_user_defined", False):
            raise NotImplementedError("Pipeline decoding keeps the KV on the stages: it cannot fill a user's cache.")
