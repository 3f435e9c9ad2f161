"""Lossless self-speculative decoding with the model's own exits, per sequence in a batch.

`model.generate(..., early_exit_mode="speculative", early_exit_threshold=T, num_speculative_tokens=k)` returns
exactly what full-depth decoding returns (greedy: token for token; sampling: the same distribution), faster when
the exits often agree with the final head.

A round, for every unfinished sequence of the batch at once:

1. **Draft** up to `k` tokens. Each draft token runs the layers up to the first active exit whose confidence is
   `>= T` and is taken from that exit (greedy, or sampled from its processed distribution), so every token picks
   its own draft depth. A token that no exit is confident about is drafted from the deepest active exit anyway
   (the default), or ends the sequence's draft (`stop_draft_when_unsure=True`; the final head then gives it).
2. **Verify** every drafted token in one pass through the layers it skipped: each column resumes from the hidden
   state where its draft stopped, so the shallow keys/values the draft computed are reused (same weights, same
   inputs: they are the full model's). The final head then scores every drafted position.
3. **Accept** the longest prefix the final head agrees with (greedy: the same argmax; sampling: speculative
   rejection sampling, accept with probability `min(1, p/q)`, on rejection draw from `max(0, p - q)`), plus the
   final head's own next token; the keys/values beyond it are rolled back.

Each sequence accepts its own number of tokens. All sequences share the buffers' columns (the draft and verify
passes stay batched); a sequence that accepted fewer tokens than another leaves masked, never-attended columns
("holes") behind, and its positions stay contiguous, so its attention sees exactly its own tokens. The returned
`sequences` are compacted (holes removed), right-padded with the pad token like transformers' output.

The keys/values, per-row fill counts, exit decisions, masks and rotary inputs are `EarlyExitDecoder`'s: this module
only drives it. Like it, this file is shipped next to the weights as remote code (only `torch`, `transformers`
and its neighbour are imported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .early_exit_decoder import EarlyExitDecoder, PassKind, decide_exit
from .early_exit_settings import EarlyExitSettings, EarlyExitStats
from .generation_early_exit import GenerateEarlyExitDecoderOnlyOutput, check_decoding_request

EARLY_EXIT_MODES = ("lossy", "speculative")
SPECULATIVE_GENERATION_KEYS = ("early_exit_mode", "num_speculative_tokens", "stop_draft_when_unsure")
DEFAULT_SPECULATIVE_TOKENS = 4


@dataclass(frozen=True)
class SpeculativeSettings:
    """How early exit decodes.

    Args:
        mode (`str`): `"lossy"` (tokens leave at confident exits, EE-LLM) or `"speculative"` (exits only draft,
            the full model verifies: output identical to full depth).
        num_speculative_tokens (`int`): most tokens drafted per round (`k`).
        stop_draft_when_unsure (`bool`): end a sequence's draft at a token no exit is confident about (the final
            head then gives it); by default it is drafted from the deepest active exit and drafting goes on.
    """

    mode: str = "lossy"
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    stop_draft_when_unsure: bool = False

    @property
    def lossless(self) -> bool:
        return self.mode == "speculative"

    @classmethod
    def resolve(
        cls,
        early_exit: EarlyExitSettings,
        overrides: dict[str, Any],
        generation_configs: Iterable[GenerationConfig | None],
    ) -> SpeculativeSettings:
        """Settings from `generate` kwargs first, then the first generation config that defines them, then defaults."""
        configs = [config for config in generation_configs if config is not None]

        def setting(name: str, default: Any) -> Any:
            if name in overrides:
                return overrides[name]
            return next((getattr(config, name) for config in configs if hasattr(config, name)), default)

        mode = setting("early_exit_mode", None) or "lossy"
        if mode not in EARLY_EXIT_MODES:
            raise ValueError(f"`early_exit_mode` must be one of {EARLY_EXIT_MODES}, got {mode!r}.")
        tokens = setting("num_speculative_tokens", None)
        tokens = DEFAULT_SPECULATIVE_TOKENS if tokens is None else tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"`num_speculative_tokens` must be an integer >= 1, got {tokens!r}.")
        stop = setting("stop_draft_when_unsure", None)
        stop = False if stop is None else stop
        if not isinstance(stop, bool):
            raise ValueError(f"`stop_draft_when_unsure` must be True or False, got {stop!r}.")
        if mode == "speculative" and early_exit.threshold is None:
            raise ValueError(
                "`early_exit_mode='speculative'` needs `early_exit_threshold` (the confidence at which an exit "
                "drafts a token), got None."
            )
        if mode == "speculative" and not early_exit.active_exits:
            raise ValueError("`early_exit_mode='speculative'` drafts with the exits, but no exit is active "
                             f"(active_exits={list(early_exit.active_exits)!r}).")
        return cls(mode=mode, num_speculative_tokens=tokens, stop_draft_when_unsure=stop)


@dataclass
class SpeculativeStats(EarlyExitStats):
    """`EarlyExitStats` of a speculative call: `tokens_per_exit` counts accepted tokens at the exit that drafted
    them, and the final head's tokens (corrections and bonus tokens) at `num_hidden_layers`.

    Args:
        rounds (`int`): draft-and-verify rounds, summed over sequences.
        draft_tokens (`int`): tokens drafted.
        accepted_draft_tokens (`int`): drafted tokens the final head accepted.
        verify_token_layers (`int`): token-layers the verification passes computed (also in `layer_tokens`).
    """

    rounds: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    verify_token_layers: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.num_tokens / self.rounds if self.rounds else float("nan")


@dataclass
class _Draft:
    """One sequence's draft in a round: tokens, the exit layer of each, and (sampling) their draft distributions."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    layers: list[int] = dataclasses.field(default_factory=list)
    probs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    open: bool = True


class SpeculativeDecoder(EarlyExitDecoder):
    """Drives `EarlyExitDecoder`'s passes as draft, verify and roll back, and keeps each row's accepted tokens.

    `base` is the column of every unfinished row's newest token, not yet fed to the model. Row `r`'s accepted
    tokens are `tokens[r]` (their columns may be interleaved with holes), at positions `next_position[r] - 1`.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: EarlyExitSettings,
        speculative: SpeculativeSettings,
        input_ids: torch.LongTensor,
        max_length: int,
    ):
        super().__init__(model, settings, input_ids, max_length + speculative.num_speculative_tokens + 1)
        self.speculative = speculative
        self.stats = SpeculativeStats(**{f.name: getattr(self.stats, f.name) for f in dataclasses.fields(self.stats)})
        self.deepest_exit = settings.active_exits[-1] if settings.active_exits else None
        self.draft_depth = self.exit_layers[self.deepest_exit] if settings.active_exits else 0
        self.tokens: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.token_layers: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.next_position = [0] * self.batch_size
        self.base = self.prompt_length
        self._captured: tuple[torch.Tensor, list[int], int] | None = None
        self._force_deepest = False

    # --------------------------------------------------------------------------------------------- passes

    def prefill_logits(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Compute the prompt at full depth; return the final head's `(batch, vocab)` logits at its last column."""
        rows = self.prepare_prompt(attention_mask, position_ids, None)
        hidden = self._full_depth(rows, self.prompt_length - 1, PassKind.PREFILL)[0][:, -1]
        self.next_position = (self.positions[:, self.prompt_length - 1] + 1).tolist()
        self.stats.final_head_tokens += len(rows)
        return self.model.lm_head(self.backbone.norm(hidden)).to(self.confidence_dtype)

    def draft_step(self, rows: list[int], column: int) -> dict[int, tuple[int, torch.Tensor]]:
        """Feed `column` of `rows` up to their first confident exit; return `{row: (exit layer, raw logits)}`.

        Rows that no exit is confident about stop after the deepest active exit without a decision (or, when
        drafting goes on regardless, take that exit's logits).
        """
        self._force_deepest = not self.speculative.stop_draft_when_unsure
        try:
            decisions = self.run_pass(rows, column, PassKind.DECODE, decide=True, fill=False, depth=self.draft_depth)
        finally:
            self._force_deepest = False
        return {row: (decision.layer, decision.logits[index])
                for decision in decisions for index, row in enumerate(decision.rows)}

    def verify(self, rows: list[int], top: int) -> torch.Tensor:
        """Bring `rows` to full depth up to column `top`; the final head's `(rows, top - base + 1, vocab)` logits."""
        layer_tokens = self.stats.layer_tokens
        x, start = self._full_depth(rows, top, PassKind.VERIFY)
        hidden = x[:, self.base - start:]
        self.stats.verify_token_layers += self.stats.layer_tokens - layer_tokens
        self.stats.final_head_tokens += hidden.shape[0] * hidden.shape[1]
        return self.model.lm_head(self.backbone.norm(hidden)).to(self.confidence_dtype)

    def _full_depth(self, rows: list[int], top: int, kind: PassKind) -> tuple[torch.Tensor, int]:
        """Run `rows` to full depth up to `top`; the last layer's output for `rows` and its first column."""
        self.on_last_layer = self._capture
        try:
            self.run_pass(rows, top, kind, decide=False, fill=True)
        finally:
            self.on_last_layer = None
        x, x_rows, start = self._captured
        self._captured = None
        if x_rows != rows or start > self.base:
            raise RuntimeError(f"verification covered rows {x_rows} from column {start}, expected {rows} from "
                               f"{self.base}: the KV bookkeeping is inconsistent.")
        return x, start

    def _capture(self, x: torch.Tensor, rows: list[int], start: int) -> None:
        self._captured = (x, rows, start)

    # The draft of an unsure token comes from the deepest active exit when drafting goes on regardless.
    def _decide_exit(self, exit_module: nn.Module, exit_index: int, hidden: torch.Tensor
                     ) -> tuple[list[int], torch.Tensor]:
        if self._force_deepest and exit_index == self.deepest_exit:
            # every confidence (and gate probability) is >= 0
            every_row = dataclasses.replace(self.settings, threshold=0.0, gate_threshold=0.0)
            return decide_exit(self.model, exit_module, exit_index, hidden, every_row, self.confidence_dtype,
                               self.stats)
        return super()._decide_exit(exit_module, exit_index, hidden)

    # ------------------------------------------------------------------------------------------- bookkeeping

    def ensure_capacity(self, columns: int) -> None:
        if columns > self.capacity:
            self._grow(columns)

    def place(self, row: int, column: int, token: int, position: int) -> None:
        """Write a (draft or accepted) token of `row` at `column` with its position, visible to later columns."""
        self.ids[row, column] = token
        self.positions[row, column] = position
        self.key_mask[row, column] = True

    def commit(self, accepted: dict[int, int], next_tokens: dict[int, int]) -> None:
        """Keep each row's first `accepted[row]` draft columns, put its next token after the longest accepted
        draft of the round, mask the columns in between (holes), and roll the KV back past them."""
        longest = max(accepted.values())
        new_base = self.base + longest + 1
        self.ensure_capacity(new_base + 1)
        for row, count in accepted.items():
            hole_start = self.base + count + 1
            if hole_start < new_base:
                self.key_mask[row, hole_start:new_base] = False
                self.row_padded[row] = True
            self.place(row, new_base, next_tokens[row], self.next_position[row] + count)
            for layer in self.cache_layers:
                filled = self.filled[layer]
                filled[row] = min(filled[row], new_base)
        self.base = new_base


def speculative_decoding(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    early_exit_settings: EarlyExitSettings | None = None,
    speculative_settings: SpeculativeSettings | None = None,
    early_exit_streamer: BaseStreamer | None = None,
    **model_kwargs: Any,
) -> GenerateEarlyExitDecoderOnlyOutput | torch.LongTensor:
    """The decoding loop of speculative early exit (greedy search and sampling), a `custom_generate` callable."""
    cache = check_decoding_request(generation_config, model_kwargs)
    if getattr(cache, "_is_user_defined", False) or (cache is not None and cache.get_seq_length() > 0):
        raise NotImplementedError("Speculative early exit does not take or return a cache: leave `cache` unset.")
    config = generation_config
    if config.return_dict_in_generate and (config.output_scores or config.output_logits):
        raise NotImplementedError(
            "Speculative early exit cannot return per-step scores or logits (sequences accept different numbers of "
            "tokens per step); use `early_exit_mode='lossy'` or full depth for them."
        )
    batch_size, prompt_length = input_ids.shape
    if early_exit_streamer is not None and batch_size > 1:
        raise NotImplementedError("Streaming supports one sequence: pass a batch of 1.")

    loop = _SpeculativeLoop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                            early_exit_settings, speculative_settings, early_exit_streamer)
    loop.run(model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"))
    sequences, exit_layers = loop.outputs()
    if not generation_config.return_dict_in_generate:
        return sequences
    return GenerateEarlyExitDecoderOnlyOutput(
        sequences=sequences, exit_layers=exit_layers, early_exit_stats=loop.decoder.stats
    )


def _check_row_independent(processors: LogitsProcessorList, batch_size: int) -> None:
    """Sequences accept different numbers of tokens, so processors are called on groups of rows: refuse those
    that hold per-row state for the whole batch (e.g. a repetition penalty that skips each row's padding)."""
    if batch_size == 1:
        return
    for processor in processors:
        for name, value in vars(processor).items():
            per_row = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
            if per_row and "token" not in name:  # token-id sets (EOS ids) are not per-row state
                raise NotImplementedError(
                    f"Speculative early exit cannot apply {type(processor).__name__} to a batch of {batch_size}: it "
                    f"keeps per-sequence state ({name!r}). Generate one sequence at a time, or use "
                    "`early_exit_mode='lossy'`."
                )


class _SpeculativeLoop:
    """One speculative `generate` call: rounds of draft, verify, accept, until every sequence is finished.

    Logits processors and stopping criteria see each sequence's own tokens (prompt, then accepted tokens), as they
    would in full-depth decoding; sequences of equal length share one call.
    """

    def __init__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, settings,
                 speculative, streamer):
        self.decoder = SpeculativeDecoder(model, settings, speculative, input_ids, generation_config.max_length)
        self.k = speculative.num_speculative_tokens
        self.processors, self.criteria, self.streamer = logits_processor, stopping_criteria, streamer
        _check_row_independent(logits_processor, input_ids.shape[0])
        self.do_sample = generation_config.do_sample
        self.max_length = generation_config.max_length
        self.has_eos_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        pad = generation_config._pad_token_tensor
        self.pad_token_id = int(pad.item()) if pad is not None else None
        batch_size, self.prompt_length = input_ids.shape
        # each row's own sequence (prompt, accepted tokens, then the round's drafts), for processors and criteria
        self.sequences = input_ids.new_zeros(batch_size, self.max_length + self.k + 1)
        self.sequences[:, : self.prompt_length] = input_ids
        self.lengths = [self.prompt_length] * batch_size
        eos = generation_config._eos_token_tensor
        self.eos_ids = set() if eos is None else set(eos.flatten().tolist())
        # Stopping criteria may keep state for the whole batch (lm-eval's do), so they are called as full-depth
        # decoding calls them: on the whole batch, one length at a time, once every row has reached that length.
        self.checked = self.prompt_length
        self.done = [False] * batch_size
        self.end: list[int | None] = [None] * batch_size

    # -------------------------------------------------------------------------------------------------- loop

    def run(self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
        decoder = self.decoder
        rows = list(range(decoder.batch_size))
        logits = decoder.prefill_logits(attention_mask, position_ids)
        first = self._choose(rows, [0] * len(rows), logits)
        decoder.ensure_capacity(decoder.base + 1)
        for row, token in zip(rows, first):
            decoder.place(row, decoder.base, token, decoder.next_position[row])
        self._accept({row: ([], [token]) for row, token in zip(rows, first)})
        while True:
            self._check_stops()
            rows = self._unfinished()
            if not rows:
                break
            self._round(rows)
        stats = decoder.stats
        for row in range(decoder.batch_size):
            for layer in decoder.token_layers[row][: self._final_length(row) - self.prompt_length]:
                stats.tokens_per_exit[layer] += 1
        if self.streamer is not None:
            self.streamer.end()

    def _round(self, rows: list[int]) -> None:
        decoder, base = self.decoder, self.decoder.base
        room = {row: min(self.k, self._room(row) - 1) for row in rows}
        drafts = self._draft(rows, room)
        top = base + max(len(drafts[row].tokens) for row in rows)
        decoder.ensure_capacity(top + 1)
        for row in rows:  # columns after a shorter draft are computed for nothing (and masked by the roll-back)
            for column in range(base + len(drafts[row].tokens) + 1, top + 1):
                decoder.place(row, column, 0, decoder.next_position[row] + column - base - 1)
        logits = decoder.verify(rows, top)
        outcome, accepted = {}, {}
        for index, row in enumerate(rows):
            tokens, layers, next_token = self._verdict(row, drafts[row], logits[index])
            outcome[row] = (layers, tokens + [next_token])
            accepted[row] = len(tokens)
        stats = decoder.stats
        stats.rounds += len(rows)
        stats.draft_tokens += sum(len(draft.tokens) for draft in drafts.values())
        stats.accepted_draft_tokens += sum(accepted.values())
        decoder.commit(accepted, {row: tokens[-1] for row, (_, tokens) in outcome.items()})
        self._accept(outcome)

    def _draft(self, rows: list[int], room: dict[int, int]) -> dict[int, _Draft]:
        """Draft up to `room[row]` tokens per row, each from the first confident exit."""
        decoder, base = self.decoder, self.decoder.base
        drafts = {row: _Draft() for row in rows}
        decoder.ensure_capacity(base + max(room.values()) + 1)
        for step in range(max(room.values())):
            active = [row for row in rows if drafts[row].open and step < room[row]]
            if not active:
                break
            decided = decoder.draft_step(active, base + step)
            fired = [row for row in active if row in decided]
            for row in active:
                if row not in decided:
                    drafts[row].open = False
            if not fired:
                break
            logits = torch.stack([decided[row][1] for row in fired]).to(decoder.confidence_dtype)
            scores = self._process(fired, [step] * len(fired), logits, drafts)
            if self.do_sample:
                probs = scores.softmax(dim=-1)
                tokens = torch.multinomial(probs, num_samples=1).squeeze(1).tolist()
            else:
                probs, tokens = None, scores.argmax(dim=-1).tolist()
            for index, (row, token) in enumerate(zip(fired, tokens)):
                draft = drafts[row]
                draft.tokens.append(token)
                draft.layers.append(decided[row][0])
                if probs is not None:
                    draft.probs.append(probs[index])
                decoder.place(row, base + step + 1, token, decoder.next_position[row] + step)
                self.sequences[row, self.lengths[row] + step] = token
        return drafts

    def _verdict(self, row: int, draft: _Draft, logits: torch.Tensor) -> tuple[list[int], list[int], int]:
        """Accepted draft tokens, their exit layers, and the final head's next token (a correction or a bonus)."""
        count = len(draft.tokens)
        scores = self._process([row] * (count + 1), list(range(count + 1)), logits[: count + 1], {row: draft})
        if not self.do_sample:
            choices = scores.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < count and draft.tokens[accepted] == choices[accepted]:
                accepted += 1
            return draft.tokens[:accepted], draft.layers[:accepted], choices[accepted]
        probs = scores.softmax(dim=-1)
        for index, token in enumerate(draft.tokens):
            target, proposal = probs[index], draft.probs[index]
            if torch.rand((), device=probs.device) * proposal[token] >= target[token]:
                residual = (target - proposal).clamp(min=0)
                next_token = torch.multinomial(residual / residual.sum(), num_samples=1).item()
                return draft.tokens[:index], draft.layers[:index], next_token
        return draft.tokens, draft.layers, torch.multinomial(probs[count], num_samples=1).item()

    # ------------------------------------------------------------------------------------------ per sequence

    def _process(self, rows: list[int], offsets: list[int], logits: torch.Tensor, drafts: dict[int, _Draft]):
        """Logits processors on each `(row, offset)`: the row's sequence plus its first `offset` draft tokens."""
        if not self.processors:
            return logits
        for row, draft in drafts.items():
            self.sequences[row, self.lengths[row]:self.lengths[row] + len(draft.tokens)] = torch.tensor(
                draft.tokens, dtype=self.sequences.dtype)
        scores = torch.empty_like(logits)
        groups: dict[int, list[int]] = {}
        for index, (row, offset) in enumerate(zip(rows, offsets)):
            groups.setdefault(self.lengths[row] + offset, []).append(index)
        for length, indices in groups.items():
            ids = self.sequences[[rows[index] for index in indices], :length]
            scores[indices] = self.processors(ids, logits[indices])
        return scores

    def _choose(self, rows: list[int], offsets: list[int], logits: torch.Tensor) -> list[int]:
        scores = self._process(rows, offsets, logits, {})
        if self.do_sample:
            return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1).tolist()
        return scores.argmax(dim=-1).tolist()

    def _accept(self, outcome: dict[int, tuple[list[int], list[int]]]) -> None:
        """Append each row's new tokens (up to the length limit, and up to an end-of-sequence token)."""
        decoder, num_layers = self.decoder, self.decoder.num_layers
        for row, (draft_layers, tokens) in outcome.items():
            for token, layer in zip(tokens, [*draft_layers, num_layers]):
                if self.lengths[row] >= self.max_length:
                    break
                self.sequences[row, self.lengths[row]] = token
                self.lengths[row] += 1
                decoder.tokens[row].append(token)
                decoder.token_layers[row].append(layer)
                if self.has_eos_criteria and token in self.eos_ids:
                    break
            decoder.next_position[row] += len(tokens)

    def _check_stops(self) -> None:
        """Run the stopping criteria on every length all rows still needed have reached."""
        batch_size = len(self.lengths)
        while not all(self.done):
            needed = [row for row in range(batch_size) if not (self.has_eos_criteria and self.done[row])]
            if self.checked >= min(self.lengths[row] for row in needed):
                return
            length = self.checked + 1
            flags = self.criteria(self.sequences[:, :length], None)
            flags = torch.as_tensor(flags, dtype=torch.bool).flatten().expand(batch_size).tolist()
            if self.streamer is not None and not self.done[0]:
                self.streamer.put(self.sequences[:1, length - 1:length].cpu())
            for row in range(batch_size):
                if flags[row] and not self.done[row]:
                    self.done[row], self.end[row] = True, length
                    if self.has_eos_criteria:  # later lengths see padding there, as in full-depth decoding
                        self.sequences[row, length:] = self.pad_token_id
            self.checked = length

    def _unfinished(self) -> list[int]:
        """Rows that need more tokens. Without EOS criteria a finished row still generates (as in transformers)
        until every row is finished; with them it stops, and so does a row whose end-of-sequence token is known."""
        if all(self.done):
            return []
        rows = [row for row, length in enumerate(self.lengths) if length < self.max_length]
        if not self.has_eos_criteria:
            return rows
        return [row for row in rows if not self.done[row]
                and not (self.lengths[row] > self.prompt_length and self.decoder.tokens[row][-1] in self.eos_ids)]

    def _room(self, row: int) -> int:
        """Tokens row `row` may still generate."""
        return self.max_length - self.lengths[row]

    def _final_length(self, row: int) -> int:
        if self.has_eos_criteria:
            return self.end[row] if self.end[row] is not None else self.lengths[row]
        return self.checked if all(self.done) else self.lengths[row]

    def outputs(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The compacted sequences, right-padded with the pad token, and each generated token's layer (-1: pad)."""
        lengths = [self._final_length(row) for row in range(len(self.lengths))]
        width = max(lengths)
        if any(length < width for length in lengths) and self.pad_token_id is None:
            raise ValueError("Sequences ended at different lengths but there is no `pad_token_id` to pad them with.")
        sequences = self.sequences[:, :width].clone()
        layers = torch.full((len(lengths), width - self.prompt_length), -1, dtype=torch.long)
        for row, length in enumerate(lengths):
            if length < width:
                sequences[row, length:] = self.pad_token_id
            row_layers = self.decoder.token_layers[row][: length - self.prompt_length]
            layers[row, : len(row_layers)] = torch.tensor(row_layers, dtype=torch.long)
        return sequences, layers.to(sequences.device)


__all__ = [
    "EARLY_EXIT_MODES",
    "SPECULATIVE_GENERATION_KEYS",
    "SpeculativeDecoder",
    "SpeculativeSettings",
    "SpeculativeStats",
    "speculative_decoding",
]
