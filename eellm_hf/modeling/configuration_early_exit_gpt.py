"""EarlyExitGPT model configuration.

This file is self-contained (it imports only from `transformers`) so that it can be shipped next to the
weights as remote code: `AutoConfig.from_pretrained(dir, trust_remote_code=True)`.
"""

import math
import numbers

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


class EarlyExitGPTConfig(PreTrainedConfig):
    r"""
    Configuration of an early-exit decoder: a Llama-style backbone (RMSNorm, rotary embeddings, SwiGLU MLP,
    grouped-query attention) with extra output heads ("exits") after some of its layers, as in EE-LLM.

    Backbone attributes keep transformers' standard names (`vocab_size`, `hidden_size`, `intermediate_size`,
    `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `max_position_embeddings`,
    `rms_norm_eps`, `hidden_act`, `tie_word_embeddings`, `attention_bias`, `initializer_range`,
    `rope_parameters`; `rope_theta` and `rope_scaling` are accepted and folded into `rope_parameters`).

    Early-exit attributes:
        exit_layers (`list[int]`): 1-based index of each layer after which an exit sits, strictly increasing
            in `[1, num_hidden_layers - 1]`. The final head is implicit and not listed.
        exit_loss_weights (`list[float]`): training weight of each exit's loss, aligned with `exit_layers`
            (the final head's weight is 1). Defaults to 1.0 per exit.
        exit_norm (`bool`): an RMSNorm before each exit's projection.
        exit_mlp (`bool`): a residual SwiGLU MLP in each exit (after its norm).
        exit_block (`bool`): a whole extra decoder layer at the start of each exit, with its own KV cache.
        exit_gate (`bool`): a learned confidence gate in each exit (a linear map of the exit's hidden state to one
            logit, as CALM's classifier): trained to predict that the exit's top token equals the final head's,
            and read by `generate(..., exit_confidence="gate")` *before* the exit's vocabulary projection, so an
            exit that does not fire costs no projection.
        exit_gate_before_mlp (`bool`): the gate reads the exit's hidden state after its block and norm but before
            its MLP (needs `exit_gate` and `exit_mlp`), so an exit that does not fire costs its norm and gate
            only, not its MLP. Defaults to False: the gate reads the exit's output (the meaning of configs saved
            without this field).
        tie_exit_heads (`bool`): every exit projects with the final LM head's weight (itself tied to the input
            embedding when `tie_word_embeddings`); otherwise each exit has its own projection.
        exit_vocab (`list[int]`, *optional*): a shortlist of token ids the exits predict among (a vocabulary-pruned
            exit head): each exit projects onto these rows of its projection only, and every other token gets
            logit -inf (probability 0), so a leaving token costs `len(exit_vocab) / vocab_size` of a full
            projection. Stored sorted and without repeats. `None` (the default): the whole vocabulary.

    Example:

    ```python
    >>> from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
    >>> config = EarlyExitGPTConfig(num_hidden_layers=8, hidden_size=256, intermediate_size=688,
    ...                             num_attention_heads=4, exit_layers=[2, 4], exit_loss_weights=[0.25, 0.5])
    >>> model = EarlyExitGPTForCausalLM(config)
    ```
    """

    model_type = "early_exit_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    exit_layers: list[int] | None = None
    exit_loss_weights: list[float] | None = None
    exit_norm: bool = True
    exit_mlp: bool = False
    exit_block: bool = False
    exit_gate: bool = False
    exit_gate_before_mlp: bool = False
    tie_exit_heads: bool = False
    exit_vocab: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate_architecture()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check_exit_types()
        self.exit_layers = [int(layer) for layer in (self.exit_layers or [])]
        if self.exit_loss_weights is None:
            self.exit_loss_weights = [1.0] * len(self.exit_layers)
        self.exit_loss_weights = [float(weight) for weight in self.exit_loss_weights]
        self.validate_exits()
        self.exit_vocab = self._checked_exit_vocab()
        super().__post_init__(**kwargs)

    @property
    def num_exits(self) -> int:
        """Number of early exits (the final head not included)."""
        return len(self.exit_layers)

    # Validation in transformers' style (`validate_architecture`, as `LlamaConfig`), called from `__post_init__` so
    # that a bad value raises a plain `ValueError` / `TypeError`: transformers' `@strict` would wrap it in
    # huggingface_hub's `StrictDataclass*Error`, which is neither.

    def validate_architecture(self) -> None:
        """The backbone's sizes are positive and fit together (heads, key/value heads, rotary head size)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or set `head_dim` explicitly."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by "
                f"`num_key_value_heads` ({self.num_key_value_heads})."
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2 != 0):
            raise ValueError(f"`head_dim` must be a positive even integer for rotary embeddings, got {self.head_dim}.")
        if not 0.0 <= self.initializer_range <= 1.0:
            raise ValueError(f"`initializer_range` must be in [0, 1], got {self.initializer_range}.")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}.")

    def _check_exit_types(self) -> None:
        """Refuse values that would silently mean something else (`exit_layers="12"` is not `[1, 2]`, 1.9 is
        not layer 1, `exit_mlp="false"` is not False)."""
        for name in ("exit_layers", "exit_loss_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise TypeError(f"`{name}` must be a list, got {type(value).__name__} {value!r}.")
        for layer in self.exit_layers or []:
            if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
                raise TypeError(f"`exit_layers` entries must be integers, got {layer!r} in {self.exit_layers!r}.")
        for weight in self.exit_loss_weights or []:
            if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
                raise TypeError(f"`exit_loss_weights` entries must be numbers, got {weight!r} in "
                                f"{self.exit_loss_weights!r}.")
            if not math.isfinite(weight):
                raise ValueError(f"`exit_loss_weights` entries must be finite, got {weight!r} in "
                                 f"{self.exit_loss_weights!r}.")
        for name in ("exit_norm", "exit_mlp", "exit_block", "exit_gate", "exit_gate_before_mlp", "tie_exit_heads"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be true or false, got {type(value).__name__} {value!r}.")

    def validate_exits(self) -> None:
        """Exits sit after distinct backbone layers in increasing order, with one non-negative weight each."""
        layers, weights = self.exit_layers, self.exit_loss_weights
        for layer in layers:
            if not 1 <= layer <= self.num_hidden_layers - 1:
                raise ValueError(
                    f"exit_layers entry {layer} is outside [1, {self.num_hidden_layers - 1}] "
                    f"(num_hidden_layers={self.num_hidden_layers}; the final head is implicit)."
                )
        for previous, current in zip(layers, layers[1:]):
            if current <= previous:
                raise ValueError(f"`exit_layers` must be strictly increasing, got {layers}.")
        if len(weights) != len(layers):
            raise ValueError(
                f"`exit_loss_weights` ({weights}) must have one weight per exit in `exit_layers` ({layers})."
            )
        for weight in weights:
            if not weight >= 0.0:
                raise ValueError(f"`exit_loss_weights` entries must be >= 0, got {weight} in {weights}.")
        if self.exit_gate_before_mlp and not (self.exit_gate and self.exit_mlp):
            raise ValueError(f"`exit_gate_before_mlp` needs `exit_gate` and `exit_mlp`, got exit_gate={self.exit_gate}"
                             f" and exit_mlp={self.exit_mlp}.")

    def _checked_exit_vocab(self) -> list[int] | None:
        """`exit_vocab` sorted and without repeats, after checking that it lists token ids of this vocabulary."""
        ids = self.exit_vocab
        if ids is None:
            return None
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"`exit_vocab` must be a list of token ids or None, got {type(ids).__name__} {ids!r}.")
        if not ids:
            raise ValueError("`exit_vocab` must list at least one token id, got [] (None: the whole vocabulary).")
        for token in ids:
            wrong_type = not isinstance(token, numbers.Integral) or isinstance(token, bool)
            if wrong_type or not 0 <= token < self.vocab_size:
                raise (TypeError if wrong_type else ValueError)(
                    f"`exit_vocab` entries must be token ids in [0, {self.vocab_size - 1}] "
                    f"(vocab_size={self.vocab_size}), got {token!r}.")
        return sorted({int(token) for token in ids})


__all__ = ["EarlyExitGPTConfig"]
