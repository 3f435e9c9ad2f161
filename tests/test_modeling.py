"""EarlyExitGPT against transformers' Llama and hand computations (fp32, CPU)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
from eellm_hf.modeling.convert import early_exit_to_llama, llama_to_early_exit

ATOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> EarlyExitGPTConfig:
    fields = dict(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, exit_layers=[1, 3], exit_loss_weights=[0.3, 0.6],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rope_theta=1000.0,
    )
    fields.update(overrides)
    return EarlyExitGPTConfig(**fields)


def build(config: EarlyExitGPTConfig, seed: int = 0) -> EarlyExitGPTForCausalLM:
    torch.manual_seed(seed)
    model = EarlyExitGPTForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so that a wrong norm shows up
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def llama_twin(model: EarlyExitGPTForCausalLM) -> LlamaForCausalLM:
    """transformers' own Llama with the same backbone weights, built independently of our converter."""
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias,
        rope_parameters=dict(c.rope_parameters), pad_token_id=c.pad_token_id,
    )).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("model.exits.", "exit_lm_heads."))}
    llama.load_state_dict(state, strict=not c.tie_word_embeddings)
    if c.tie_word_embeddings:
        llama.tie_weights()
    return llama


def padded_batch(pad_side: str, vocab_size: int = 97):
    torch.manual_seed(1)
    lengths = [9, 6, 3]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(3, vocab_size, (length,))
        span = slice(max(lengths) - length, None) if pad_side == "left" else slice(0, length)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


LLAMA_CASES = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "bias-one-exit": dict(attention_bias=True, exit_layers=[2], exit_loss_weights=[1.0]),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
@pytest.mark.parametrize("pad_side", ["none", "left", "right"])
def test_final_logits_equal_llama(case, pad_side):
    model = build(tiny_config(**LLAMA_CASES[case]))
    llama = llama_twin(model)
    if pad_side == "none":
        ids, mask = torch.randint(3, 97, (2, 11)), None
    else:
        ids, mask = padded_batch(pad_side)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ref = llama(input_ids=ids, attention_mask=mask).logits
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert (ours - ref)[valid].abs().max() <= ATOL


@pytest.mark.parametrize("exit_block", [False, True])
def test_cache_matches_no_cache(exit_block):
    model = build(tiny_config(exit_block=exit_block, exit_mlp=True))
    ids, mask = padded_batch("left")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        prefix = model(input_ids=ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
        cache = prefix.cache
        for step in range(3, 0, -1):
            position = ids.shape[1] - step
            out = model(input_ids=ids[:, position:position + 1], attention_mask=mask[:, :position + 1],
                        cache=cache, use_cache=True)
            cache = out.cache
            assert (out.logits[:, -1] - full.logits[:, position]).abs().max() <= ATOL
            for exit_out, exit_full in zip(out.exit_logits, full.exit_logits):
                assert (exit_out[:, -1] - exit_full[:, position]).abs().max() <= ATOL


def test_past_key_values_alias_and_generate_match_llama():
    model = build(tiny_config())
    llama = llama_twin(model)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        prefix = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     past_key_values=prefix.cache)
        ref_prefix = llama(input_ids=ids, attention_mask=mask, use_cache=True)
        ref_step = llama(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                         cache=ref_prefix.cache)
    assert (step.logits - ref_step.logits).abs().max() <= ATOL
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), llama.generate(ids, **kwargs))


def reference_exit_logits(model, ids, mask=None):
    """Exit logits computed by hand from Llama's per-layer hidden states."""
    llama = llama_twin(model)
    hidden = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    result = []
    for index, layer in enumerate(model.config.exit_layers):
        h = hidden[layer]
        exit_module = model.model.exits[index]
        if model.config.exit_norm:
            w = exit_module.norm.weight
            h = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps))
        if model.config.exit_mlp:
            mlp = exit_module.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        weight = model.lm_head.weight if model.config.tie_exit_heads else model.exit_lm_heads[index].weight
        result.append(h @ weight.T)
    return result


def forward_with_labels(model):
    """Labels (some ignored), the model's output with them, and the exits' logits computed by hand."""
    ids = torch.randint(3, 97, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        return labels, model(input_ids=ids, labels=labels), reference_exit_logits(model, ids)


@pytest.mark.parametrize("options", [dict(), dict(exit_mlp=True), dict(exit_norm=False, tie_exit_heads=True),
                                     dict(tie_exit_heads=True, tie_word_embeddings=True)])
def test_exit_logits_and_loss_by_hand(options):
    model = build(tiny_config(**options))
    labels, out, expected_exits = forward_with_labels(model)
    for ours, ref in zip(out.exit_logits, expected_exits):
        assert (ours - ref).abs().max() <= ATOL

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)

    final_loss = ce(out.logits)
    exit_losses = [ce(logits) for logits in expected_exits]
    total = final_loss + sum(w * loss for w, loss in zip(model.config.exit_loss_weights, exit_losses))
    assert torch.allclose(out.loss, total, rtol=1e-5, atol=0)
    for ours, ref in zip(out.exit_losses, exit_losses):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(tie_exit_heads=True, tie_word_embeddings=True)])
def test_shortlisted_exit_logits_and_loss_by_hand(options):
    """With `exit_vocab` an exit's logits are its projection at the shortlist's rows and -inf elsewhere, and its
    cross-entropy sums over the labels it can predict, divided by the number of all labels."""
    shortlist = list(range(3, 97, 2))
    model = build(tiny_config(exit_vocab=shortlist[::-1] + shortlist[:5], **options))  # any order, repeats
    assert model.config.exit_vocab == shortlist
    labels, out, expected_exits = forward_with_labels(model)
    outside = torch.ones(97, dtype=torch.bool)
    outside[shortlist] = False
    exit_labels = labels.clone()
    exit_labels[outside[labels.clamp(min=0)] & (labels != -100)] = -100
    assert (exit_labels != labels).any() and (exit_labels[:, 1:] != -100).any()
    for ours, ref, loss in zip(out.exit_logits, expected_exits, out.exit_losses):
        assert torch.isneginf(ours[..., outside]).all()
        assert (ours[..., shortlist] - ref[..., shortlist]).abs().max() <= ATOL
        shifted = ours[:, :-1].reshape(-1, 97)
        expected = F.cross_entropy(shifted, exit_labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        expected = expected / (labels[:, 1:] != -100).sum()  # a label outside the shortlist costs nothing
        assert torch.allclose(loss, expected, rtol=1e-5, atol=0)
    gathered = model._shortlist(model.exit_projection(0).weight)[0]
    with model.reusing_exit_shortlists():  # generation gathers the shortlist's rows once
        first = model._shortlist(model.exit_projection(0).weight)[0]
        assert model._shortlist(model.exit_projection(0).weight)[0] is first and torch.equal(first, gathered)
    assert model._shortlist(model.exit_projection(0).weight)[0] is not first


def test_exit_block_is_a_decoder_layer_on_the_exit_hidden_state():
    model = build(tiny_config(exit_block=True))
    ids = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        layer_out = out.hidden_states[model.config.exit_layers[0]]
        # The exit block is a Llama decoder layer: reuse the first exit's block on its own input.
        block = model.model.exits[0].block
        position_ids = torch.arange(8)[None]
        position_embeddings = model.model.rotary_emb(layer_out, position_ids)
        causal = torch.full((8, 8), float("-inf")).triu(1)[None, None]
        h = block(layer_out, attention_mask=causal, position_embeddings=position_embeddings)
        h = model.model.exits[0].norm(h)
        expected = model.exit_lm_heads[0](h)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert (out.exit_logits[0] - expected).abs().max() <= ATOL


def test_fresh_exit_heads_are_random_and_distinct():
    model = build(tiny_config(exit_layers=[1, 2, 3], exit_loss_weights=[1.0, 1.0, 1.0]))
    heads = [head.weight for head in model.exit_lm_heads] + [model.lm_head.weight]
    for i in range(len(heads)):
        for j in range(i + 1, len(heads)):
            assert not torch.equal(heads[i], heads[j])
    std = torch.stack([h.std() for h in heads[:-1]])
    assert torch.allclose(std, torch.full_like(std, model.config.initializer_range), rtol=0.1)


INVALID_CONFIGS = [
    dict(exit_layers=[0]),
    dict(exit_layers=[4]),
    dict(exit_layers=[2, 2], exit_loss_weights=[1.0, 1.0]),
    dict(exit_layers=[3, 1], exit_loss_weights=[1.0, 1.0]),
    dict(exit_layers=[1, 2], exit_loss_weights=[1.0]),
    dict(exit_layers=[1], exit_loss_weights=[-0.5]),
    dict(exit_layers=[1], exit_loss_weights=[float("nan")]),
    dict(num_attention_heads=5),
    dict(num_key_value_heads=3),
    dict(num_hidden_layers=0, exit_layers=[]),
    dict(vocab_size=-1),
    dict(rms_norm_eps=0.0),
    dict(initializer_range=2.0),
    dict(exit_vocab=[5, 32000]),
    dict(exit_vocab=[-1]),
    dict(exit_vocab=[]),
]


@pytest.mark.parametrize("bad", INVALID_CONFIGS, ids=[str(b) for b in INVALID_CONFIGS])
def test_invalid_config_raises_value_error(bad):
    fields = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, exit_layers=[1])
    fields.update(bad)
    if "exit_layers" in bad and "exit_loss_weights" not in bad:
        fields["exit_loss_weights"] = [1.0] * len(bad["exit_layers"])
    with pytest.raises(ValueError) as error:
        EarlyExitGPTConfig(**fields)
    named = {str(v) for v in bad.values()} | {str(x) for v in bad.values() if isinstance(v, list) for x in v}
    assert any(value in str(error.value) for value in named), str(error.value)


def test_config_rope_theta_and_round_trip(tmp_path):
    config = tiny_config(rope_theta=12345.0)
    assert config.rope_parameters["rope_theta"] == 12345.0
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EarlyExitGPTConfig)
    assert loaded.exit_layers == [1, 3] and loaded.exit_loss_weights == [0.3, 0.6]
    assert loaded.rope_parameters["rope_theta"] == 12345.0


def test_save_load_round_trip_and_model_card(tmp_path):
    model = build(tiny_config(exit_mlp=True, exit_block=True, exit_vocab=list(range(0, 97, 3))))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)
    card = (tmp_path / "README.md").read_text()
    assert "after layer 1 of 4" in card and "after layer 3 of 4" in card and "early_exit_threshold" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is EarlyExitGPTForCausalLM
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        a, b = model(input_ids=ids), loaded(input_ids=ids)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.exit_logits, b.exit_logits))
    assert loaded.config.exit_vocab == list(range(0, 97, 3)) and "among 33 of the vocabulary's 97 tokens" in card


def test_remote_code_loads_without_eellm_hf(tmp_path):
    model = build(tiny_config(exit_block=True))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.util
        sys.path = [p for p in sys.path if p not in ('', {str(REPO_ROOT)!r})]
        sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]
        assert importlib.util.find_spec('eellm_hf') is None, 'eellm_hf must not be importable here'
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
        data = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=data['ids']).logits
        assert torch.equal(logits, data['logits']), (logits - data['logits']).abs().max()
        print('REMOTE_OK')
    """)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_resize_token_embeddings_resizes_exit_heads():
    model = build(tiny_config())
    model.resize_token_embeddings(120)
    assert model.lm_head.weight.shape[0] == 120
    assert all(head.weight.shape[0] == 120 for head in model.exit_lm_heads)
    out = model(input_ids=torch.randint(100, 120, (1, 5)))
    assert out.logits.shape[-1] == 120 and all(e.shape[-1] == 120 for e in out.exit_logits)


def test_resize_token_embeddings_keeps_the_shortlist_inside_the_vocabulary():
    model = build(tiny_config(exit_vocab=[3, 50, 90]))
    model.resize_token_embeddings(120)
    assert model.config.exit_vocab == [3, 50, 90]
    model.resize_token_embeddings(60)
    assert model.config.exit_vocab == [3, 50]
    out = model(input_ids=torch.randint(3, 60, (1, 5)))
    assert all(torch.isfinite(e[..., [3, 50]]).all() and e.shape[-1] == 60 for e in out.exit_logits)
    with pytest.raises(ValueError, match=r"resizing to 2 tokens leaves none of `config.exit_vocab`"):
        model.resize_token_embeddings(2)
    assert model.lm_head.weight.shape[0] == 60  # refused before anything changed


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(3, 97, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = build(tiny_config(exit_block=True)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_dtype_and_device_map_loading(tmp_path):
    build(tiny_config()).save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.exit_lm_heads[0].weight.dtype == torch.bfloat16
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert mapped.device.type == "cpu"
    out = mapped(input_ids=torch.randint(3, 97, (1, 4)))
    assert torch.isfinite(out.logits).all()


def test_sdpa_and_eager_agree():
    config = tiny_config()
    ids, mask = padded_batch("left")
    logits = {}
    for implementation in ("sdpa", "eager"):
        config._attn_implementation = implementation
        model = build(config)
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, attention_mask=mask).logits
    assert (logits["sdpa"] - logits["eager"])[mask.bool()].abs().max() <= ATOL


def test_llama_conversion_round_trip(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).eval()
    llama.generation_config.max_new_tokens = 17
    model = llama_to_early_exit(llama, [1, 2], exit_init="copy", exit_loss_weights=[0.5, 0.5])
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rms_norm_eps == 1e-5
    assert model.generation_config.max_new_tokens == 17
    ids, mask = padded_batch("left")
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = model(input_ids=ids, attention_mask=mask)
        back = early_exit_to_llama(model)(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours.logits - ref.logits)[valid].abs().max() <= ATOL
    assert torch.equal(back, ref.logits)
    for index, layer in enumerate([1, 2]):  # copy init: the final norm + head applied after layer k
        expected = llama.lm_head(llama.model.norm(ref.hidden_states[layer]))
        assert (ours.exit_logits[index] - expected)[valid].abs().max() <= ATOL
    random_init = llama_to_early_exit(llama, [2], exit_init="random")
    assert not torch.equal(random_init.exit_lm_heads[0].weight, llama.lm_head.weight)


def test_qwen2_and_mistral_conversion():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    sources = (Qwen2ForCausalLM(Qwen2Config(**shape)), MistralForCausalLM(MistralConfig(**shape, sliding_window=None)))
    for source in sources:
        source.eval()
        with torch.no_grad():
            for name, param in source.named_parameters():
                if name.endswith("bias"):
                    param.normal_()
        model = llama_to_early_exit(source, [1])
        ids = torch.randint(3, 97, (2, 7))
        with torch.no_grad():
            assert (model(input_ids=ids).logits - source(input_ids=ids).logits).abs().max() <= ATOL
    with pytest.raises(ValueError, match="sliding_window=4"):
        llama_to_early_exit(MistralForCausalLM(MistralConfig(**shape, sliding_window=4)), [1])


def test_convert_cli(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=4, num_attention_heads=4))
    src = tmp_path / "llama"
    llama.save_pretrained(src)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"<unk>": 0}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(src)
    dst = tmp_path / "ee"
    text = tmp_path / "tuning.txt"
    text.write_text("w9 w5 w9 w7\nw5 w9 w7 w3 w5 w9")  # w9 four times, w5 three, w7 twice
    result = subprocess.run([sys.executable, "-m", "eellm_hf.modeling.convert", str(src), str(dst),
                             "--exit-layers", "1", "3", "--exit-init", "copy",
                             "--exit-vocab-size", "3", "--exit-vocab-text", str(text)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.exit_layers == [1, 3] and model.config.exit_vocab == [5, 7, 9]
    assert (dst / "tokenizer.json").exists()
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - llama(input_ids=ids).logits).abs().max() <= ATOL


def test_transformers_trainer_loss_falls(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = build(tiny_config()).train()
    pattern = torch.arange(3, 35).repeat(4)[:64]  # a learnable sequence
    data = Dataset.from_dict({"input_ids": [pattern.tolist()] * 32, "labels": [pattern.tolist()] * 32})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                             learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.75 * losses[0], losses
