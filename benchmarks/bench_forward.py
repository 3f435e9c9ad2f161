"""EarlyExitGPT at full depth against transformers' LlamaForCausalLM with the same weights.

Measures prefill (one forward over the prompt) and greedy decoding with `generate()`, at batch 1 and 8, taking
turns between the two models in one run so that machine noise hits both alike, and keeping the best of
`--repeats` runs of each. Prints the time ratio
EarlyExitGPT / Llama (target: <= 1.05; exits are not evaluated at full depth).

    python benchmarks/bench_forward.py [--layers 12 --hidden 768 --repeats 5]
"""

import argparse
import time

import torch
from transformers import LlamaForCausalLM

from eellm_hf import EarlyExitGPTConfig, EarlyExitGPTForCausalLM
from eellm_hf.modeling.convert import early_exit_to_llama


def timed(run, model) -> float:
    start = time.perf_counter()
    run(model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = EarlyExitGPTConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, max_position_embeddings=1024,
        exit_layers=[args.layers // 4, args.layers // 2], exit_loss_weights=[0.25, 0.5],
        pad_token_id=0, eos_token_id=None,
    )
    early_exit = EarlyExitGPTForCausalLM(config).eval()
    llama: LlamaForCausalLM = early_exit_to_llama(early_exit)
    models = {"early_exit": early_exit, "llama": llama}
    print(f"torch threads: {torch.get_num_threads()}; {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}, exits after {config.exit_layers}")
    print(f"{'phase':<10}{'batch':>6}{'EarlyExitGPT s':>16}{'Llama s':>10}{'ratio':>8}")
    for batch in (1, 8):
        prompt = torch.randint(1, args.vocab, (batch, args.prompt_len))
        phases = {
            "prefill": lambda m, p=prompt: m(input_ids=p, use_cache=True, logits_to_keep=1),
            "decode": lambda m, p=prompt: m.generate(p, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                     do_sample=False, pad_token_id=0),
        }
        for phase, run in phases.items():
            times = {name: [] for name in models}
            with torch.inference_mode():
                for model in models.values():  # warm-up
                    run(model)
                for _ in range(args.repeats):
                    for name, model in models.items():
                        times[name].append(timed(run, model))
            ours, ref = min(times["early_exit"]), min(times["llama"])
            print(f"{phase:<10}{batch:>6}{ours:>16.4f}{ref:>10.4f}{ours / ref:>8.3f}")


if __name__ == "__main__":
    main()
