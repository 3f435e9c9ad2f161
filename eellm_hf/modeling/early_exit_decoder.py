"""The early-exit decoder: runs an `EarlyExitGPTForCausalLM` token by token with per-row exits and exact KV
recomputation (see `generation_early_exit` for the decision rule and the bookkeeping it implies).

A pass (`run_pass`) brings some rows through the model up to a column, one layer at a time. Each layer is a
layer step (`_layer_step`: every row computes the columns it misses there, resuming from saved hidden states)
followed, after an active exit, by a head step (`_head_step`: the exit's block, then its confidence on the rows
still undecided, then the rows that leave save their hidden states and drop out). The pass's state is a
`DecodingPass`; what kind of pass it is (`PassKind`) decides only how its work is counted.

The functions at the end are shared, stage by stage, with pipeline-parallel decoding.

This file is shipped next to the weights as remote code: it imports only `torch`, `transformers` and its neighbours.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .early_exit_settings import GATED_MEASURES, EarlyExitSettings, EarlyExitStats


class PassKind(str, enum.Enum):
    """Why a pass runs; it decides where the pass's work is counted in `EarlyExitStats` (a `str`: compares equal
    to its value)."""

    PREFILL = "prefill"  # the prompt, at full depth
    DECODE = "decode"  # a new token (its refills count as recomputation)
    VERIFY = "verify"  # speculative decoding: drafted tokens brought to full depth
    COMPLETION = "completion"  # after decoding: the returned cache completed (counted apart)


@dataclass
class ExitDecision:
    """The rows whose next token one head produces, with that head's raw logits."""

    rows: list[int]
    layer: int
    logits: torch.Tensor


@dataclass(slots=True)
class DecodingPass:
    """The state of one pass of `EarlyExitDecoder.run_pass` over columns up to `end - 1`.

    `x` holds the hidden states of rows `x_rows` for columns `x_start:end` as the last layer step left them;
    `x_starts[i]` is the first column row `x_rows[i]` computed there. `alive` are the rows still going deeper,
    `undecided` those still waiting for a head, `refill_from[row]` the first column a row recomputed.
    """

    kind: PassKind
    top: int
    end: int  # top + 1
    fill: bool
    alive: list[int]
    undecided: set[int]
    refill_from: dict[int, int]
    decisions: list[ExitDecision] = field(default_factory=list)
    x: torch.Tensor | None = None
    x_rows: list[int] = field(default_factory=list)
    x_starts: list[int] = field(default_factory=list)
    x_start: int = 0

    def clear(self) -> None:
        """No row ran the last layer: nothing to carry to the next one."""
        self.x, self.x_rows, self.x_starts, self.x_start = None, [], [], self.end


class KVWriter:
    """Stands in for a `Cache` inside a decoder layer's attention.

    It writes the layer's new keys/values for the planned rows and window of columns (only where `valid`), and
    returns the layer's keys/values of those rows up to the window's end.
    """

    def __init__(self, keys: list[torch.Tensor | None], values: list[torch.Tensor | None]):
        self.keys, self.values = keys, values
        self.rows: slice | torch.Tensor = slice(None)
        self.start, self.end = 0, 0
        self.valid: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows, start, end = self.rows, self.start, self.end
        if self.valid is None:
            keys[rows, :, start:end] = key_states
            values[rows, :, start:end] = value_states
        else:
            keys[rows, :, start:end] = torch.where(self.valid, key_states, keys[rows, :, start:end])
            values[rows, :, start:end] = torch.where(self.valid, value_states, values[rows, :, start:end])
        return keys[rows, :, :end], values[rows, :, :end]


class EarlyExitDecoder:
    """Runs an `EarlyExitGPTForCausalLM` token by token with per-row exits and per-row, per-layer KV bookkeeping.

    Keys/values live in preallocated `(batch, kv_heads, capacity, head_dim)` tensors, one per cache layer (backbone
    layers, then the active exits' blocks). `filled[layer][row]` counts the leading columns of `row` whose KV is
    computed at `layer`; it never grows with depth, and an exit block's count equals that of the layer it follows.
    `saved_hidden[row, column - prompt_length]` holds the hidden state at which a generated column's computation
    last stopped, from which the next layer that needs it resumes (prompt columns are computed at full depth at
    once).
    """

    def __init__(self, model: nn.Module, settings: EarlyExitSettings, input_ids: torch.LongTensor, max_length: int):
        config = model.config
        self.model, self.backbone, self.settings, self.config = model, model.model, settings, config
        self.num_layers = config.num_hidden_layers
        self.exit_layers = list(config.exit_layers)
        self.exit_after = {self.exit_layers[index] - 1: index for index in settings.active_exits}
        batch_size, prompt_length = input_ids.shape
        self.batch_size, self.prompt_length = batch_size, prompt_length
        device = input_ids.device
        self.device = device
        self.dtype = self.backbone.embed_tokens.weight.dtype
        self.confidence_dtype = torch.promote_types(self.dtype, torch.float32)
        self.capacity = max(int(max_length), prompt_length + 1)

        self.ids = input_ids.new_zeros(batch_size, self.capacity)
        self.ids[:, :prompt_length] = input_ids
        self.positions = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.row_padded = [False] * batch_size
        self.saved_hidden = torch.zeros(batch_size, self.capacity - prompt_length, config.hidden_size,
                                        dtype=self.dtype, device=device)
        self.arange = torch.arange(self.capacity, device=device)

        num_cache_layers = self.num_layers + len(self.exit_layers)
        self.cache_layers = list(range(self.num_layers))
        if config.exit_block:
            self.cache_layers += [self.num_layers + index for index in settings.active_exits]
        kv_shape = (batch_size, config.num_key_value_heads, self.capacity, config.head_dim)
        self.keys: list[torch.Tensor | None] = [None] * num_cache_layers
        self.values: list[torch.Tensor | None] = [None] * num_cache_layers
        for layer in self.cache_layers:
            self.keys[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=device)
            self.values[layer] = torch.zeros(kv_shape, dtype=self.dtype, device=device)
        self.filled = [[0] * batch_size for _ in range(num_cache_layers)]
        self.cache_lengths = [0] * num_cache_layers
        self.writer = KVWriter(self.keys, self.values)

        exit_report = tuple(self.exit_layers[index] for index in settings.active_exits) + (self.num_layers,)
        self.stats = EarlyExitStats(
            exit_layers=exit_report,
            tokens_per_exit=dict.fromkeys(exit_report, 0),
            exit_block_tokens=[0] * len(self.exit_layers),
            exit_head_tokens=[0] * len(self.exit_layers),
            exit_gate_tokens=[0] * len(self.exit_layers),
            exit_mlp_tokens=[0] * len(self.exit_layers),
        )
        self._pass_cache: dict[Any, Any] = {}
        self.on_last_layer: Callable[[torch.Tensor, list[int], int], None] | None = None

    # ----------------------------------------------------------------------------------------------- public steps

    def prefill(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None
    ) -> list[ExitDecision]:
        """Compute the prompt at full depth (from what `cache` lacks) and decide each row's first new token."""
        rows = self.prepare_prompt(attention_mask, position_ids, cache)
        return self.run_pass(rows, self.prompt_length - 1, PassKind.PREFILL, decide=True, fill=True)

    def prepare_prompt(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None
    ) -> list[int]:
        """Set the prompt's key mask and positions, load what `cache` holds; return the rows to prefill."""
        prompt_length = self.prompt_length
        key_mask, positions = prompt_mask_and_positions(attention_mask, position_ids, self.batch_size, prompt_length,
                                                        self.device)
        self.key_mask[:, :prompt_length] = key_mask
        self.positions[:, :prompt_length] = positions
        self.row_padded = (~key_mask).any(dim=-1).tolist()

        start = 0
        if cache is not None and cache.get_seq_length() > 0:
            start = self._load_cache(cache)
        for layer in self.cache_layers:
            self.filled[layer] = [start] * self.batch_size
        self.stats.prefill_tokens = (prompt_length - start) * self.batch_size
        return list(range(self.batch_size))

    def step(self, rows: list[int], column: int) -> list[ExitDecision]:
        """Feed the token at `column` of each of `rows` and decide their next tokens."""
        return self.run_pass(rows, column, PassKind.DECODE, decide=True, fill=False)

    def append(self, tokens: torch.LongTensor, column: int) -> None:
        """Record the tokens generated at `column` (all rows)."""
        if column >= self.capacity:
            self._grow(column + 1)
        self.ids[:, column] = tokens
        self.positions[:, column] = self.positions[:, column - 1] + 1

    def gather_logits(self, decisions: list[ExitDecision]) -> tuple[torch.Tensor, list[int]]:
        """The `(batch, vocab)` next-token logits (zeros for rows not computed) and the layer of each row."""
        return gather_decisions(decisions, self.stats, self.batch_size, self.config.vocab_size, self.confidence_dtype,
                                self.device)

    def write_cache(self, cache: Cache, length: int) -> None:
        """Complete every row's KV up to column `length - 1` and append what `cache` lacks to it.

        Backbone layers and the active exits' blocks are completed; the block KV of exits turned off by
        `active_exits` is not computed (a later early-exit call that uses them catches it up from the cache).
        """
        rows = [
            row for row in range(self.batch_size)
            if any(self.filled[layer][row] < length for layer in self.cache_layers)
        ]
        if rows:
            self.run_pass(rows, length - 1, PassKind.COMPLETION, decide=False, fill=True)
        while len(cache.layers) <= self.cache_layers[-1]:
            cache.layers.append(DynamicLayer())
        for layer in self.cache_layers:
            begin = self.cache_lengths[layer]
            if begin < length:
                cache.layers[layer].update(
                    self.keys[layer][:, :, begin:length].clone(), self.values[layer][:, :, begin:length].clone()
                )


    # ------------------------------------------------------------------------------------------------- the pass

    def run_pass(
        self, rows: list[int], top: int, kind: PassKind, decide: bool, fill: bool, depth: int | None = None
    ) -> list[ExitDecision]:
        """Bring `rows` through the model up to column `top`.

        At each layer, a row computes all its columns missing there up to `top`. With `decide`, the rows' heads are
        evaluated on column `top` in depth order; a row stops at the first confident exit unless `fill` is set or
        its backlog reached `max_recompute_tokens`, in which case it goes on to full depth without more heads.
        A `depth` below `num_hidden_layers` ends the pass after that many layers (a speculative draft): rows still
        undecided there keep their hidden states to resume from and get no decision. `on_last_layer`, when set,
        receives the last backbone layer's output `(x, rows, first column)` (a speculative verification).
        """
        if top + 1 > self.capacity:
            self._grow(top + 1)
        self._pass_cache = {}
        state = DecodingPass(kind=kind, top=top, end=top + 1, fill=fill, alive=list(rows),
                             undecided=set(rows) if decide else set(), refill_from=dict.fromkeys(rows, top),
                             x_start=top + 1)
        depth = self.num_layers if depth is None else depth
        for layer_idx in range(depth):
            plan = self._layer_step(state, layer_idx)
            exit_index = self.exit_after.get(layer_idx)
            if plan is None or exit_index is None:
                continue
            self._head_step(state, exit_index, plan)
            if not state.alive:
                break
        if depth < self.num_layers:
            if state.alive:
                self._stop(state, set(state.alive))
        elif state.undecided:
            self._final_head(state)
        if kind is PassKind.DECODE:
            self.stats.recomputed_tokens += sum(top - column for column in state.refill_from.values())
        return state.decisions

    def _layer_step(self, state: DecodingPass, layer_idx: int) -> dict[str, Any] | None:
        """Run backbone layer `layer_idx` over the alive rows' missing columns; return the layer's mask and rotary
        inputs (None when no row had work there)."""
        end = state.end
        filled = self.filled[layer_idx]
        work = [row for row in state.alive if filled[row] < end]
        if not work:
            state.clear()
            return None
        starts = [filled[row] for row in work]
        start = min(starts)
        x = state.x
        if layer_idx == 0:
            x = self.backbone.embed_tokens(self.ids[self._selector(work), start:end])
        elif not (x is not None and state.x_rows == work and state.x_starts == starts):
            x = self._resume(state, work, starts, start)
        valid = None if starts.count(start) == len(starts) else self._valid(starts, start, end)
        plan = self._plan(work, start, end, valid)
        x = self.backbone.layers[layer_idx](x, cache=self.writer, use_cache=True, **plan)
        refill_from = state.refill_from
        for row, row_start in zip(work, starts):
            filled[row] = end
            if row_start < refill_from[row]:
                refill_from[row] = row_start
        self._count(state.kind, work, starts, start, end)
        state.x, state.x_rows, state.x_starts, state.x_start = x, work, starts, start
        if layer_idx == self.num_layers - 1 and self.on_last_layer is not None:
            self.on_last_layer(x, work, start)
        return plan

    def _head_step(self, state: DecodingPass, exit_index: int, plan: dict[str, Any]) -> None:
        """Exit `exit_index` after the layer step: its block on the same rows and columns, then its decision on
        the undecided rows' last column; the rows it decides that may stop there leave the pass."""
        exit_module = self.backbone.exits[exit_index]
        y = state.x
        if hasattr(exit_module, "block"):
            y = exit_module.block(y, cache=self.writer, use_cache=True, **plan)
            block_filled = self.filled[self.num_layers + exit_index]
            for row in state.x_rows:
                block_filled[row] = state.end
            self._count(state.kind, state.x_rows, state.x_starts, state.x_start, state.end,
                        exit_block=exit_index)
        if not state.undecided:
            return
        x_rows, undecided = state.x_rows, state.undecided
        positions = [index for index, row in enumerate(x_rows) if row in undecided]
        head_rows = [x_rows[index] for index in positions]
        hidden = y[:, -1] if len(positions) == len(x_rows) else y[positions, -1]
        fired, fired_logits = self._decide_exit(exit_module, exit_index, hidden)
        if not fired:
            return
        fired_rows = [head_rows[index] for index in fired]
        state.decisions.append(ExitDecision(fired_rows, self.exit_layers[exit_index], fired_logits))
        undecided.difference_update(fired_rows)
        if state.fill:
            return
        cap, deepest_filled, end = self.settings.max_recompute_tokens, self.filled[self.num_layers - 1], state.end
        stopping = {row for row in fired_rows if cap is None or end - deepest_filled[row] < cap}
        if stopping:
            self._stop(state, stopping)

    def _final_head(self, state: DecodingPass) -> None:
        """The final norm and LM head on the last column of the rows no exit decided."""
        x_rows, undecided = state.x_rows, state.undecided
        positions = [index for index, row in enumerate(x_rows) if row in undecided]
        hidden = state.x[:, -1] if len(positions) == len(x_rows) else state.x[positions, -1]
        logits = self.model.lm_head(self.backbone.norm(hidden))
        self.stats.final_head_tokens += len(positions)
        state.decisions.append(ExitDecision([x_rows[index] for index in positions], self.num_layers, logits))

    def _stop(self, state: DecodingPass, stopping: set[int]) -> None:
        """Save the stopping rows' hidden states (to resume from later) and drop them from the pass."""
        keep, offset, end, x, x_start = [], self.prompt_length, state.end, state.x, state.x_start
        for index, (row, row_start) in enumerate(zip(state.x_rows, state.x_starts)):
            if row in stopping:
                self.saved_hidden[row, row_start - offset:end - offset] = x[index, row_start - x_start:]
            else:
                keep.append(index)
        state.alive = [row for row in state.alive if row not in stopping]
        if not keep:
            state.clear()
            return
        state.x_rows = [state.x_rows[index] for index in keep]
        state.x_starts = [state.x_starts[index] for index in keep]
        state.x_start = min(state.x_starts)
        state.x = x[keep, state.x_start - x_start:]

    def _resume(self, state: DecodingPass, work: list[int], starts: list[int], start: int) -> torch.Tensor:
        """Input of a layer where some columns resume from `saved_hidden`: saved states, then this pass's outputs."""
        end = state.end
        sel = self._selector(work)
        x_in = self.saved_hidden[sel, start - self.prompt_length:end - self.prompt_length]
        if isinstance(sel, slice):
            x_in = x_in.clone()
        if state.x is not None:
            index_of = {row: index for index, row in enumerate(state.x_rows)}
            for position, row in enumerate(work):
                index = index_of.get(row)
                if index is not None:
                    row_start = state.x_starts[index]
                    x_in[position, row_start - start:] = state.x[index, row_start - state.x_start:]
        return x_in

    # ----------------------------------------------------------------------------------------------- helpers

    def _plan(self, work: list[int], start: int, end: int, valid: torch.Tensor | None) -> dict[str, Any]:
        """Point the KV writer at `work` rows and columns `start:end`; return the layer's mask and rotary inputs."""
        key = (tuple(work), start)
        cached = self._pass_cache.get(key)
        if cached is None:
            sel = self._selector(work)
            cached = (sel, self._mask(work, sel, start, end), self._rotary(sel, start, end))
            self._pass_cache[key] = cached
        sel, mask, position_embeddings = cached
        writer = self.writer
        writer.rows, writer.start, writer.end = sel, start, end
        writer.valid = valid
        return {"attention_mask": mask, "position_embeddings": position_embeddings}

    def _selector(self, rows: list[int]) -> slice | torch.Tensor:
        """Index of `rows` in the batch dimension: a slice (views, no copies) when they are contiguous."""
        first = rows[0]
        if rows[-1] - first + 1 == len(rows):
            return slice(first, first + len(rows))
        return torch.tensor(rows, device=self.device)

    def _valid(self, starts: list[int], start: int, end: int) -> torch.Tensor:
        """`(rows, 1, columns, 1)` mask of the window's columns each row actually computes."""
        row_starts = torch.tensor(starts, device=self.device)
        return (self.arange[start:end][None, :] >= row_starts[:, None])[:, None, :, None]

    def _mask(self, rows: list[int], sel: slice | torch.Tensor, start: int, end: int) -> torch.Tensor | None:
        """Additive `(rows, 1, queries, keys)` mask: causal over columns `start:end`, padding hidden."""
        if end - start == 1 and not any(self.row_padded[row] for row in rows):
            return None
        return causal_padding_mask(self.key_mask[sel, :end], start, self.dtype)

    def _rotary(self, sel: slice | torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_embeddings(self.backbone.rotary_emb, self.positions[sel, start:end], self.dtype)

    def _decide_exit(self, exit_module: nn.Module, exit_index: int, hidden: torch.Tensor
                     ) -> tuple[list[int], torch.Tensor]:
        return decide_exit(self.model, exit_module, exit_index, hidden, self.settings, self.confidence_dtype,
                           self.stats, self._fire)

    def _fire(self, logits: torch.Tensor) -> list[bool]:
        return exit_fires(logits, self.settings, self.confidence_dtype)

    def _count(
        self, kind: PassKind, work: list[int], starts: list[int], start: int, end: int, exit_block: int | None = None
    ) -> None:
        """Account one layer (or exit block) run over `work` rows, columns `start:end`, in the stats."""
        stats = self.stats
        useful = sum(end - row_start for row_start in starts)
        if kind is PassKind.COMPLETION:
            stats.completion_token_layers += useful
            return
        stats.padding_token_layers += len(work) * (end - start) - useful
        if exit_block is None:
            stats.layer_tokens += useful
        else:
            stats.exit_block_tokens[exit_block] += useful
        if kind is PassKind.DECODE:
            stats.recomputed_token_layers += useful - len(work)

    def _load_cache(self, cache: Cache) -> int:
        """Copy `cache` into the KV tensors; return the first column some needed cache layer lacks."""
        lengths = []
        for layer in self.cache_layers:
            length = cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0
            self.cache_lengths[layer] = length
            lengths.append(length)
        start = min(lengths)
        if start >= self.prompt_length:
            raise ValueError(
                f"The cache already holds {start} tokens but `input_ids` has only {self.prompt_length}: pass the "
                "whole sequence (cached tokens and new ones)."
            )
        if start > 0:
            for layer in self.cache_layers:
                cached = cache.layers[layer]
                if cached.keys.shape[0] != self.batch_size:
                    raise ValueError(
                        f"The cache holds {cached.keys.shape[0]} sequences but the batch has {self.batch_size}."
                    )
                self.keys[layer][:, :, :start] = cached.keys[:, :, :start]
                self.values[layer][:, :, :start] = cached.values[:, :, :start]
        return start

    def _grow(self, needed: int) -> None:
        """Enlarge every buffer along the sequence dimension (only when stopping criteria allow > max_length)."""
        extra = max(needed, 2 * self.capacity) - self.capacity

        def pad(tensor: torch.Tensor, dim: int, value: float = 0) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = extra
            return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)

        self.ids = pad(self.ids, 1)
        self.positions = pad(self.positions, 1)
        self.key_mask = pad(self.key_mask, 1, True)
        self.saved_hidden = pad(self.saved_hidden, 1)
        for layer in self.cache_layers:
            self.keys[layer] = pad(self.keys[layer], 2)
            self.values[layer] = pad(self.values[layer], 2)
        self.capacity += extra
        self.arange = torch.arange(self.capacity, device=self.device)


# ------------------------------------------------------------- shared decoding steps (pipeline decoding's too)


def prompt_mask_and_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch_size: int,
    prompt_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's `(batch, prompt_length)` key mask (False on padding) and rotary positions."""
    if attention_mask is not None:
        key_mask = attention_mask[:, -prompt_length:].bool()
    else:
        key_mask = torch.ones(batch_size, prompt_length, dtype=torch.bool, device=device)
    if position_ids is not None and position_ids.shape[-1] >= prompt_length:
        positions = position_ids[..., -prompt_length:].expand(batch_size, prompt_length)
    elif attention_mask is not None:
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(prompt_length, device=device).expand(batch_size, prompt_length)
    return key_mask, positions


def causal_padding_mask(key_mask: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(rows, 1, queries, keys)` mask of queries `start:end` over keys `0:end` (`end` = the width of the
    `(rows, end)` bool `key_mask`): causal, with keys False in `key_mask` (padding) hidden."""
    end = key_mask.shape[-1]
    arange = torch.arange(end, device=key_mask.device)
    allowed = (arange[None, :] <= arange[start:end, None])[None] & key_mask[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def rotary_embeddings(
    rotary_emb: nn.Module, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layers' `position_embeddings` (cos, sin) at `positions` `(rows, columns)`."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)  # only its dtype and device are read
    return rotary_emb(probe, positions)


def decide_exit(
    model: nn.Module,
    exit_module: nn.Module,
    exit_index: int,
    hidden: torch.Tensor,
    settings: EarlyExitSettings,
    confidence_dtype: torch.dtype,
    stats: EarlyExitStats | None = None,
    fire: Callable[[torch.Tensor], list[bool]] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Which rows of `hidden` (exit `exit_index`'s block output, a row each) leave at this exit, and their logits:
    the exit's norm, residual MLP and projection (`exit_logits`), then the confidence (`fire`, default `exit_fires`).
    With a gated measure the projection runs only for the rows whose gate reaches its threshold (`"gate"`: they
    leave; `"gate_max_prob"`: they are screened in, and leave if their largest probability reaches the threshold),
    and so does the MLP when the gate reads before it (`config.exit_gate_before_mlp`). Counts work in `stats`."""

    def confident(logits: torch.Tensor, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        fires = fire(logits) if fire is not None else exit_fires(logits, settings, confidence_dtype)
        keep = [index for index, on in enumerate(fires) if on]
        return [rows[index] for index in keep], logits if len(keep) == len(rows) else logits[keep]

    normed = exit_module.normed(hidden)
    if settings.confidence not in GATED_MEASURES:
        if stats is not None:
            stats.exit_mlp_tokens[exit_index] += hidden.shape[0]
            stats.exit_head_tokens[exit_index] += hidden.shape[0]
        return confident(model.exit_logits(exit_index, exit_module.residual_mlp(normed)), list(range(hidden.shape[0])))
    before_mlp = exit_module.gate_before_mlp
    output = None if before_mlp else exit_module.residual_mlp(normed)
    screens = settings.confidence == "gate_max_prob"
    gate_threshold = settings.gate_threshold if screens else settings.threshold
    confidence = torch.sigmoid(exit_module.gate_logit(normed if before_mlp else output).to(confidence_dtype))
    passed = (confidence >= gate_threshold).nonzero().flatten().tolist()
    every_row = len(passed) == hidden.shape[0]
    if before_mlp and passed:
        output = exit_module.residual_mlp(normed if every_row else normed[passed])
    elif passed and not every_row:
        output = output[passed]
    if stats is not None:
        stats.exit_gate_tokens[exit_index] += hidden.shape[0]
        stats.exit_mlp_tokens[exit_index] += len(passed) if before_mlp else hidden.shape[0]
        stats.exit_head_tokens[exit_index] += len(passed)
    if not passed:
        return [], hidden[:0]
    logits = model.exit_logits(exit_index, output)
    return confident(logits, passed) if screens else (passed, logits)


def exit_fires(logits: torch.Tensor, settings: EarlyExitSettings, confidence_dtype: torch.dtype) -> list[bool]:
    """Whether each row's confidence reaches the threshold (computed from raw logits, float32 or wider)."""
    threshold = settings.threshold
    if threshold <= 0.0:  # every confidence is >= 0
        return [True] * logits.shape[0]
    probs = logits.to(confidence_dtype).softmax(dim=-1)
    if settings.confidence in ("max_prob", "gate_max_prob"):
        confidence = probs.amax(dim=-1)
    else:
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    return (confidence >= threshold).tolist()


def gather_decisions(
    decisions: list[ExitDecision],
    stats: EarlyExitStats,
    batch_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, list[int]]:
    """The `(batch, vocab)` next-token logits in `dtype` (zeros for rows not computed) and the layer of each row;
    counts the tokens per exit in `stats`."""
    layers = [-1] * batch_size
    for decision in decisions:
        stats.tokens_per_exit[decision.layer] += len(decision.rows)
        for row in decision.rows:
            layers[row] = decision.layer
    if len(decisions) == 1 and len(decisions[0].rows) == batch_size:
        return decisions[0].logits.to(dtype, copy=True), layers
    logits = torch.zeros(batch_size, vocab_size, dtype=dtype, device=device)
    for decision in decisions:
        logits[torch.tensor(decision.rows, device=device)] = decision.logits.to(dtype)
    return logits, layers

