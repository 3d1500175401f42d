#!/usr/bin/env python3
"""HF Transformers' fp32 loss of a model directory over pretokenized JSONL, the number

    nopad eval --model DIR --data DATA --dtype f32 --json

must reproduce (within 1e-5 relative on the same device class), for architectures other than
the Llama of bench/hf_baseline.py: Qwen3 (q/k norms, head_dim over hidden / heads), Mistral with
a sliding window, Llama as the control.

  hf_parity_arch.py DIR DATA [--flatten] [--device cuda]
      Prints {"system": "hf-parity-arch", "model_type", "loss", "tokens"}: the token-weighted
      causal-LM loss, one forward per example; with --flatten, all examples in one row with
      position ids restarting at 0 (transformers 5 then masks attention to each example's own
      tokens, windows included, provided no KV cache is made: hence use_cache=False) and each
      example's first label masked.

  hf_parity_arch.py --make-tiny qwen3|mistral-window|llama DIR [--seed 0]
      Writes a random tiny model (config.json, model.safetensors; fp32) and DIR/data.jsonl:
      pretokenized examples {"input_ids", "labels"} with a masked prompt, some longer than the
      window, so no tokenizer is needed on either side. Weights are drawn wider than HF's init
      and the norms' weights around 1, so every parameter kind moves the loss.

docs/BENCHMARKS.md ("Models and generation") has what it gave on an H100 and on a CPU.
"""

import argparse
import json
import random

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

from hf_baseline import IGNORE, heldout_loss, targets_of

VOCAB = 256


def make_tiny(arch, out, seed):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if arch == "qwen3":
        # Heads of 32: q_proj 64 -> 128, o_proj 128 -> 64, as Qwen3-0.6B widens 1024 -> 2048.
        cfg = Qwen3Config(head_dim=32, attention_bias=False, use_sliding_window=False, **common)
    elif arch == "mistral-window":
        cfg = MistralConfig(head_dim=16, sliding_window=8, **common)
    else:
        cfg = LlamaConfig(head_dim=16, **common)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    rng = random.Random(seed)
    with open(f"{out}/data.jsonl", "w") as f:
        for _ in range(24):
            n = rng.randint(2, 48)
            ids = [rng.randrange(3, VOCAB) for _ in range(n)]
            labels = [IGNORE if i < n // 3 else t for i, t in enumerate(ids)]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    print(f"wrote {out} ({arch}) and {out}/data.jsonl; compare:\n"
          f"  python bench/hf_parity_arch.py {out} {out}/data.jsonl\n"
          f"  nopad eval --model {out} --data {out}/data.jsonl --dtype f32 --json")


def flattened_loss(model, path, device):
    """All examples as one row: positions restart per example, each first label masked (so no
    target crosses a boundary); HF's mean over the row's targets is the token-weighted loss."""
    ids, pos, labels = [], [], []
    examples = [json.loads(line) for line in open(path)]
    for e in examples:
        lab = list(e.get("labels", e["input_ids"]))
        lab[0] = IGNORE
        ids += e["input_ids"]
        pos += range(len(e["input_ids"]))
        labels += lab
    t = lambda v: torch.tensor([v], device=device)  # noqa: E731
    model.eval()
    with torch.no_grad():
        # use_cache=False: transformers 5 reads packed examples from the position ids only when
        # no KV cache is made; with one, every token would attend across examples.
        out = model(input_ids=t(ids), position_ids=t(pos), labels=t(labels), use_cache=False)
    return float(out.loss), targets_of(examples)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir", nargs="?")
    p.add_argument("data", nargs="?")
    p.add_argument("--make-tiny", nargs=2, metavar=("ARCH", "DIR"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flatten", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.make_tiny:
        arch, out = args.make_tiny
        if arch not in ("qwen3", "mistral-window", "llama"):
            p.error(f"--make-tiny {arch}: expected qwen3, mistral-window or llama")
        return make_tiny(arch, out, args.seed)
    if not (args.dir and args.data):
        p.error("give DIR and DATA, or --make-tiny ARCH DIR")
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(args.device)
    if args.flatten:
        loss, n = flattened_loss(model, args.data, args.device)
    else:
        with torch.no_grad():
            loss, n = heldout_loss(model, args.data, args.device)
    print(json.dumps({"system": "hf-parity-arch", "model_type": model.config.model_type,
                      "loss": loss, "tokens": n}))


if __name__ == "__main__":
    main()
