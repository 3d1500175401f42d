#!/usr/bin/env python3
"""PEFT loads nopad's LoRA adapter, and HF's fp32 loss equals nopad's.

Loads BASE (an HF model directory) in fp32, wraps it with `PeftModel.from_pretrained(base,
ADAPTER)`, asserts that every tensor of ADAPTER/adapter_model.safetensors landed in the model
and that the model expects no other adapter tensor (zero missing, zero unexpected keys: a
wrong prefix would load with only a warning and leave every B at zero), then prints the
token-weighted loss over DATA (pretokenized JSONL) as JSON, to compare with

    nopad eval --model BASE --adapter ADAPTER --data DATA --dtype f32 --json

(within 1e-5 relative). docs/BENCHMARKS.md (rows L1-L3, "Parity") has what it gave on an H100:
a relative difference of 4.2e-8.

Usage: peft_parity.py BASE ADAPTER DATA [--device cuda]
"""

import argparse
import json
import sys

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_baseline import heldout_loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("data")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, args.adapter).to(args.device)
    saved = load_file(f"{args.adapter}/adapter_model.safetensors")
    live = get_peft_model_state_dict(model)  # the model's adapter tensors, under saved names
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    if missing or unexpected:
        sys.exit(f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for k, v in saved.items():
        if not torch.equal(live[k].detach().cpu().float(), v.float()):
            sys.exit(f"{k}: the loaded values differ from the file's")
    loss, n = heldout_loss(model, args.data, args.device)
    print(json.dumps({"system": "hf-peft-parity", "loss": loss, "tokens": n, "adapter_tensors": len(saved)}))


if __name__ == "__main__":
    main()
