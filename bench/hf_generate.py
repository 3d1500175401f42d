#!/usr/bin/env python3
"""HF Transformers' greedy generation, the reference for `nopad generate`: loads MODEL_DIR in fp32
and runs `generate(do_sample=False)` from the prompt IDS (no tokenizer is needed), stopping at
the model's eos ids (generation_config.json, else config.json) or after --max-new-tokens, and
prints the new ids as a JSON list (with --json, the record `nopad generate --json` writes:
prompt_ids, ids, stop).

Compare, on a tiny random model written by `nopad train --model tiny --steps 1 --out DIR`:

  python3 bench/hf_generate.py DIR 1 2 3 --max-new-tokens 16
  nopad generate --model DIR --prompt-ids 1,2,3 --max-new-tokens 16 --dtype f32 --json

The two id lists must be equal (fp32 on both sides; in bf16 an argmax near a tie may differ).
--batch PROMPTS.jsonl generates every `{"prompt_ids": [...]}` line of a file instead, one at a
time (HF pads a batch, nopad does not: one by one is the exact reference for `--prompts`).

Usage: hf_generate.py MODEL_DIR IDS... [--max-new-tokens 16] [--device cuda|cpu] [--json]
       hf_generate.py MODEL_DIR --batch PROMPTS.jsonl [--max-new-tokens 16] [--json]
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def generate(model, ids, max_new, device):
    """HF greedy generation from one prompt: the new ids and why it stopped."""
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=max_new,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    stop = "eos" if new and new[-1] in eos else "length"
    return new, stop


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("ids", nargs="*", type=int)
    ap.add_argument("--batch", help="a JSON-lines file of {\"prompt_ids\": [...]} records")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if bool(a.ids) == bool(a.batch):
        ap.error("give prompt IDS or --batch FILE, not both")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).to(a.device)
    model.eval()
    prompts = [a.ids]
    if a.batch:
        with open(a.batch) as f:
            prompts = [json.loads(l)["prompt_ids"] for l in f if l.strip()]
    for ids in prompts:
        new, stop = generate(model, ids, a.max_new_tokens, a.device)
        if a.json:
            print(json.dumps({"prompt_ids": ids, "ids": new, "stop": stop}))
        else:
            print(json.dumps(new))


if __name__ == "__main__":
    main()
