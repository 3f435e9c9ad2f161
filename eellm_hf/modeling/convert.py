"""Conversion between transformers' Llama-layout models and EarlyExitGPT.

`llama_to_early_exit` adds exits to a `LlamaForCausalLM` (or a Mistral / Qwen2 model, whose layouts are the
same up to names and biases) without touching the backbone; `early_exit_to_llama` drops them again. The CLI
`eellm-convert SRC DST_DIR --exit-layers 8 16` converts a folder, a `.gguf` file or a bundled model
(`smollm2-135m`, see `sources.BUNDLED_MODELS`), tokenizer, chat template and generation config included.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_early_exit_gpt import EarlyExitGPTConfig
from .modeling_early_exit_gpt import EarlyExitGPTForCausalLM
from .sources import resolve_source

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Config fields that change the math or the generation and have the same name in Llama and EarlyExitGPT.
SHARED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "attention_bias", "attention_dropout", "mlp_bias",
)

ExitInit = Literal["copy", "random"]


def backbone_fields(source_config) -> dict:
    """Read the backbone fields of a Llama / Mistral / Qwen2 config, refusing what EarlyExitGPT cannot express."""
    model_type = source_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Cannot convert model_type {model_type!r}: supported are {SUPPORTED_MODEL_TYPES}.")
    fields = {name: getattr(source_config, name) for name in SHARED_CONFIG_FIELDS if hasattr(source_config, name)}
    if fields.get("head_dim") is None:
        fields["head_dim"] = source_config.hidden_size // source_config.num_attention_heads
    fields["rope_parameters"] = copy.deepcopy(source_config.rope_parameters)
    sliding_window = getattr(source_config, "sliding_window", None)
    uses_sliding = getattr(source_config, "use_sliding_window", model_type == "mistral")
    if uses_sliding and sliding_window is not None and sliding_window < source_config.max_position_embeddings:
        raise ValueError(
            f"Cannot convert a {model_type} model with sliding_window={sliding_window}: EarlyExitGPT uses full "
            "attention."
        )
    if model_type == "qwen2":
        # Qwen2 has biases on q/k/v but not on o_proj: `attention_bias` with a zero o_proj bias is the same math.
        fields["attention_bias"] = True
    fields.setdefault("attention_bias", False)
    fields.setdefault("mlp_bias", False)
    return fields


def _load(model_or_source: PreTrainedModel | str | Path) -> PreTrainedModel:
    if isinstance(model_or_source, PreTrainedModel):
        return model_or_source
    return resolve_source(model_or_source).load_model(torch.float32)


def llama_to_early_exit(
    model_or_path: PreTrainedModel | str | Path,
    exit_layers: list[int],
    exit_init: ExitInit = "copy",
    **exit_options,
) -> EarlyExitGPTForCausalLM:
    """Add early exits to a Llama-layout causal LM, leaving the backbone's weights unchanged.

    Args:
        model_or_path: a `LlamaForCausalLM` (or Mistral / Qwen2 model), or where to load one from: a folder, a
            `.gguf` file (de-quantised to float32 by transformers) or a bundled model's name.
        exit_layers: 1-based layers after which exits sit.
        exit_init: `"copy"` (EE-LLM's default): each exit's norm and projection start as copies of the final
            norm and LM head, and its optional MLP / block start as the identity (zero output projections), so
            an untrained exit reads the intermediate hidden state exactly as the final head would. `"random"`:
            exits initialised from `initializer_range`.
        **exit_options: other `EarlyExitGPTConfig` early-exit fields (`exit_loss_weights`, `exit_norm`,
            `exit_mlp`, `exit_block`, `exit_gate`, `exit_gate_before_mlp`, `tie_exit_heads`, `exit_vocab`).
    """
    if exit_init not in ("copy", "random"):
        raise ValueError(f"exit_init must be 'copy' or 'random', got {exit_init!r}.")
    unknown = set(exit_options) - {"exit_loss_weights", "exit_norm", "exit_mlp", "exit_block", "exit_gate",
                                   "exit_gate_before_mlp", "tie_exit_heads", "exit_vocab"}
    if unknown:
        raise ValueError(f"Unknown early-exit options: {sorted(unknown)}.")
    source = _load(model_or_path)
    config = EarlyExitGPTConfig(
        **backbone_fields(source.config), exit_layers=list(exit_layers), **exit_options
    )
    config.dtype = source.dtype
    torch_dtype = source.dtype
    model = EarlyExitGPTForCausalLM(config).to(torch_dtype)

    state = {name: tensor for name, tensor in source.state_dict().items() if "rotary_emb" not in name}
    if source.config.model_type == "qwen2":
        for index in range(config.num_hidden_layers):
            o_proj = f"model.layers.{index}.self_attn.o_proj"
            state[f"{o_proj}.bias"] = torch.zeros_like(model.get_parameter(f"{o_proj}.bias"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [name for name in unexpected if not (config.tie_word_embeddings and name == "lm_head.weight")]
    missing = [name for name in missing if not _is_exit_parameter(name)
               and not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Weights do not match EarlyExitGPT: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    if exit_init == "copy":
        _copy_final_head_into_exits(model)
    if source.generation_config is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    return model.eval()


def _is_exit_parameter(name: str) -> bool:
    return name.startswith(("model.exits.", "exit_lm_heads."))


@torch.no_grad()
def _copy_final_head_into_exits(model: EarlyExitGPTForCausalLM) -> None:
    config = model.config
    for index, exit_module in enumerate(model.model.exits):
        if config.exit_norm:
            exit_module.norm.weight.copy_(model.model.norm.weight)
        if config.exit_mlp:
            exit_module.mlp.down_proj.weight.zero_()
            if exit_module.mlp.down_proj.bias is not None:
                exit_module.mlp.down_proj.bias.zero_()
        if config.exit_block:
            for projection in (exit_module.block.self_attn.o_proj, exit_module.block.mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
        if not config.tie_exit_heads:
            model.exit_lm_heads[index].weight.copy_(model.lm_head.weight)


def exit_vocab_from_counts(counts: torch.Tensor, size: int) -> list[int]:
    """The `size` most frequent token ids by `counts` (occurrences of each id; ties go to the lower id), sorted:
    a shortlist for `EarlyExitGPTConfig.exit_vocab`, e.g. from the text an early-exit model is tuned on."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= counts.numel():
        raise ValueError(f"the exit vocabulary size must be an integer in [1, {counts.numel()}] (the vocabulary), "
                         f"got {size!r}.")
    order = torch.argsort(counts.to(torch.int64), descending=True, stable=True)
    return sorted(order[:size].tolist())


def count_tokens(tokenizer, texts: list[str], vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id in `texts` as `tokenizer` encodes them (no special tokens added)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def early_exit_to_llama(model: EarlyExitGPTForCausalLM) -> LlamaForCausalLM:
    """Drop the exits: a `LlamaForCausalLM` with the same backbone and final head (same final logits)."""
    config = model.config
    fields = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    llama_config = LlamaConfig(**fields, rope_parameters=copy.deepcopy(config.rope_parameters))
    llama = LlamaForCausalLM(llama_config).to(model.dtype)
    state = {name: tensor for name, tensor in model.state_dict().items() if not _is_exit_parameter(name)}
    llama.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        llama.tie_weights()
    llama.generation_config = copy.deepcopy(model.generation_config)
    return llama.eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eellm-convert",
        description="Add early exits to a Llama / Mistral / Qwen2 folder and save an EarlyExitGPT folder.",
    )
    parser.add_argument("src", help="a Llama-layout model: a folder (safetensors), a .gguf file, or a bundled model "
                        "(smollm2-135m)")
    parser.add_argument("dst_dir", type=Path, help="output folder")
    parser.add_argument("--exit-layers", type=int, nargs="+", required=True, help="1-based layers with an exit")
    parser.add_argument("--exit-loss-weights", type=float, nargs="+", default=None)
    parser.add_argument("--exit-init", choices=("copy", "random"), default="copy")
    parser.add_argument("--no-exit-norm", action="store_true", help="exits without an RMSNorm")
    parser.add_argument("--exit-mlp", action="store_true")
    parser.add_argument("--exit-block", action="store_true")
    parser.add_argument("--exit-gate", action="store_true", help="learned confidence gates (exit_confidence='gate')")
    parser.add_argument("--exit-gate-before-mlp", action="store_true",
                        help="the gates read the exit's state before its MLP (needs --exit-gate and --exit-mlp): an "
                        "exit that does not fire then skips its MLP")
    parser.add_argument("--tie-exit-heads", action="store_true")
    parser.add_argument("--exit-vocab-size", type=int, default=None, metavar="K",
                        help="vocabulary-pruned exits: they predict among the K tokens most frequent in "
                        "--exit-vocab-text only (config.exit_vocab)")
    parser.add_argument("--exit-vocab-text", type=Path, nargs="+", default=None, metavar="FILE",
                        help="text files whose token counts choose the exits' shortlist (with --exit-vocab-size)")
    return parser


def _exit_vocab_from_text(args: argparse.Namespace, source, vocab_size: int) -> list[int] | None:
    """The shortlist `--exit-vocab-size` and `--exit-vocab-text` ask for (None without them)."""
    if (args.exit_vocab_size is None) != (args.exit_vocab_text is None):
        raise SystemExit("eellm-convert: --exit-vocab-size and --exit-vocab-text go together (got only "
                         f"{'--exit-vocab-size' if args.exit_vocab_text is None else '--exit-vocab-text'})")
    if args.exit_vocab_size is None:
        return None
    missing = [str(path) for path in args.exit_vocab_text if not path.is_file()]
    if missing:
        raise SystemExit(f"eellm-convert: --exit-vocab-text: no such file: {', '.join(missing)}")
    if not source.has_tokenizer():
        raise SystemExit(f"eellm-convert: --exit-vocab-text needs the source's tokenizer; {args.src} has none")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in args.exit_vocab_text]
    counts = count_tokens(source.load_tokenizer(), texts, vocab_size)
    try:
        return exit_vocab_from_counts(counts, args.exit_vocab_size)
    except ValueError as error:
        raise SystemExit(f"eellm-convert: --exit-vocab-size: {error}") from None


def _refuse_overwriting_source(src_dir: Path, dst_dir: Path) -> None:
    """The output folder must not be the source folder (saving there would replace the model being read)."""
    if dst_dir.exists() and src_dir.exists() and src_dir.resolve() == dst_dir.resolve():
        raise SystemExit(f"eellm-convert: the output folder {dst_dir} is the source folder {src_dir}; "
                         "choose another output folder")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        source = resolve_source(args.src)
    except FileNotFoundError as error:
        raise SystemExit(f"eellm-convert: {error}") from None
    _refuse_overwriting_source(source.folder, args.dst_dir)
    options = dict(exit_loss_weights=args.exit_loss_weights, exit_norm=not args.no_exit_norm,
                   exit_mlp=args.exit_mlp, exit_block=args.exit_block, exit_gate=args.exit_gate,
                   exit_gate_before_mlp=args.exit_gate_before_mlp, tie_exit_heads=args.tie_exit_heads)
    fields = backbone_fields(source.load_config())
    try:
        EarlyExitGPTConfig(**fields, exit_layers=args.exit_layers, **options)
    except (TypeError, ValueError) as error:  # before loading the weights
        raise SystemExit(f"eellm-convert: {error}") from None
    options["exit_vocab"] = _exit_vocab_from_text(args, source, fields["vocab_size"])
    model = llama_to_early_exit(source.load_model(torch.float32), args.exit_layers, exit_init=args.exit_init,
                                **options)
    model.save_pretrained(args.dst_dir)
    if source.has_tokenizer():
        source.load_tokenizer().save_pretrained(args.dst_dir)
    print(f"Saved EarlyExitGPT with exits after layers {model.config.exit_layers} to {args.dst_dir}")


if __name__ == "__main__":
    main()
