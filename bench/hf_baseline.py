#!/usr/bin/env python3
"""The seed's system, on the same run as `nopad bench --export DIR`: HF Transformers trains the
same initial weights on the same examples in the same order, and reports tokens/s, peak memory
and the loss of every step.

Modes (one per process, so peak memory is each mode's own):
  pad      right-padded micro-batches, SDPA attention (the classic baseline);
  flatten  DataCollatorWithFlattening semantics (one row, position ids restarting at 0, first
           label of each example masked, cu_seqlens handed to attention) with PyTorch's
           FlashAttention-2 varlen kernel (torch.nn.attention.varlen.varlen_attn) registered
           as a custom attention, since the flash_attn package is not installed.
  parity   loads DIR/model (written by nopad) and prints the token-weighted loss over
           DIR/heldout.jsonl in fp32: the number `nopad eval --json` must reproduce.

LoRA (--lora-r R): PEFT adapters with the same rank, alpha (default 2·R, as nopad's), dropout and
targets as `nopad bench --lora-r`, on the frozen base; only the adapters train (AdamW over them,
clipping over them). --init-adapter DIR/adapter (written by `nopad bench --export DIR` with LoRA)
loads nopad's initial adapter values, so both sides start equal; without it PEFT initialises
its own (another A). docs/BENCHMARKS.md rows L1-L6 ran this path on an H100.

The step loss is HF's causal-LM loss with `num_items_in_batch` = target tokens of the whole
optimizer step, i.e. the token-weighted loss nopad uses. AdamW (torch, fused), constant lr,
no weight decay, clipping at 1.0, bf16 parameters (HF's usual bf16 training keeps the optimizer
states in bf16 too: compare memory with that in mind).

Usage: hf_baseline.py DIR MODE [--amp] [--grad-ckpt] [--warmup 3] [--lr 1e-4] [--json OUT] [--device cpu]
                       [--lora-r R [--lora-alpha A] [--lora-dropout P] [--lora-targets all-linear|LIST]
                        [--use-rslora] [--init-adapter ADAPTER_DIR] [--load-in-4bit]]

QLoRA (--load-in-4bit, with --lora-r): the base is loaded through bitsandbytes as NF4 with double
quantisation and bf16 compute (BitsAndBytesConfig, the QLoRA paper's recipe and what TRL users
pass), every projection of the layers quantised, embeddings, norms and lm_head left in bf16 as
nopad's `--base-dtype nf4` leaves them. `prepare_model_for_kbit_training` is not called: it
would cast those bf16 tensors to fp32 and cost HF memory nopad does not spend.
"""

import argparse
import json
import sys
import time

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

IGNORE = -100
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention interface over PyTorch's varlen FlashAttention-2: [1, H, T, D] in,
    [1, T, H, D] out; boundaries from the collator's cu_seq_lens (never from a mask)."""
    cu = kwargs["cu_seq_lens_q"]
    max_len = int(kwargs["max_length_q"])
    # Under autocast the rotary embedding leaves q and k in fp32; the kernel takes bf16 only.
    q = query.transpose(1, 2)[0].to(torch.bfloat16)
    k = key.transpose(1, 2)[0].to(torch.bfloat16)
    v = value.transpose(1, 2)[0].to(torch.bfloat16)
    if k.shape[1] != q.shape[1]:  # GQA: torch 2.11's varlen_attn has no GQA flag
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if q.device.type != "cuda":  # CPU check of the plumbing only: per-segment causal SDPA
        segs = []
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            segs.append(torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scaling
            ).transpose(0, 1))
        return torch.cat(segs).unsqueeze(0), None
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0))
    return out.unsqueeze(0), None


AttentionInterface.register("nopad_varlen_fa2", varlen_attention)


def pad_batch(examples, pad_id, device):
    m = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), m), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), m), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), m), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, :n] = 1
    real = sum(len(e["input_ids"]) for e in examples)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)), real


def flat_batch(examples, device):
    """DataCollatorWithFlattening semantics, with flash-attention kwargs."""
    ids, labels, pos, cu = [], [], [], [0]
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        lab = list(e.get("labels", e["input_ids"]))
        lab[0] = IGNORE  # the first label of every example never crosses a boundary
        labels += lab
        pos += list(range(n))
        cu.append(cu[-1] + n)
    max_len = max(b - a for a, b in zip(cu, cu[1:]))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    batch = dict(
        input_ids=torch.tensor([ids], device=device),
        labels=torch.tensor([labels], device=device),
        position_ids=torch.tensor([pos], device=device),
        cu_seq_lens_q=cu_t,
        cu_seq_lens_k=cu_t,
        max_length_q=max_len,
        max_length_k=max_len,
    )
    return batch, len(ids)


def targets_of(examples):
    # HF shifts labels inside the model: position t predicts labels[t + 1]; the first label of
    # each example is never a target.
    return sum(sum(1 for l in e.get("labels", e["input_ids"])[1:] if l != IGNORE) for e in examples)


def add_lora(model, args):
    """Wraps `model` in PEFT LoRA adapters as `nopad bench --lora-*` configures them and, with
    --init-adapter, loads nopad's initial values, refusing any missing or unexpected adapter key
    (PEFT would otherwise leave those B at zero with only a warning)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    targets = ALL_LINEAR if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        use_rslora=args.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    if args.init_adapter:
        sd = load_file(f"{args.init_adapter}/adapter_model.safetensors")
        res = set_peft_model_state_dict(model, sd)
        unexpected = list(res.unexpected_keys)
        missing = [k for k in res.missing_keys if "lora_" in k]
        if unexpected or missing:
            sys.exit(f"--init-adapter: {len(missing)} adapter keys missing ({missing[:3]}), "
                     f"{len(unexpected)} unexpected ({unexpected[:3]})")
    model.print_trainable_parameters()
    return model


def train(args):
    steps = [json.loads(l) for l in open(f"{args.dir}/steps.jsonl")]
    attn = "sdpa" if args.mode == "pad" else "nopad_varlen_fa2"
    # Default: bf16 parameters and optimizer states (HF's usual bf16 training). --amp: fp32
    # parameters, gradients and AdamW states with bf16 autocast, the precision nopad keeps.
    dtype = torch.float32 if args.amp else torch.bfloat16
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            f"{args.dir}/model", dtype=dtype, attn_implementation=attn, quantization_config=quant,
            device_map={"": 0},
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            f"{args.dir}/model", dtype=dtype, attn_implementation=attn
        ).to(args.device)
    model.config.use_cache = False
    if args.lora_r:
        model = add_lora(model, args)
    if args.grad_ckpt:
        # What lets HF fit a 7-8B model on one 80 GB GPU: each layer's activations recomputed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pad_id = model.config.pad_token_id
    if pad_id is None:
        eos = model.config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    # With LoRA only the adapters train (the frozen base has requires_grad off).
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times, tokens = [], [], []
    for k, step in enumerate(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_targets = sum(targets_of(mb) for mb in step["micro_batches"])
        total, real = 0.0, 0
        for mb in step["micro_batches"]:
            if args.mode == "pad":
                batch, r = pad_batch(mb, pad_id, args.device)
            else:
                batch, r = flat_batch(mb, args.device)
            real += r
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp):
                out = model(**batch, num_items_in_batch=torch.tensor(n_targets, device=args.device))
            out.loss.backward()
            total += out.loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(total)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss)
        if k >= args.warmup:
            times.append(dt)
            tokens.append(real)
        print(f"\r  hf {args.mode:<8} step {k + 1}/{len(steps)}  loss {loss:.4f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    rates = sorted(t / s for t, s in zip(tokens, times))
    result = {
        "system": f"hf-{args.mode}" + ("-amp" if args.amp else "") + ("-ckpt" if args.grad_ckpt else "")
        + (f"-lora{args.lora_r}" if args.lora_r else "") + ("-nf4" if args.load_in_4bit else ""),
        "tokens_per_s": rates[len(rates) // 2] if rates else float("nan"),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "losses": losses,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    return result


@torch.no_grad()
def heldout_loss(model, path, device):
    """Token-weighted loss of `model` over the JSONL examples of `path` (`input_ids`, optional
    `labels`), one example at a time: what `nopad eval --json` computes."""
    model.eval()
    total, n = 0.0, 0
    for line in open(path):
        e = json.loads(line)
        ids = torch.tensor([e["input_ids"]], device=device)
        labels = torch.tensor([e.get("labels", e["input_ids"])], device=device)
        t = targets_of([e])
        if t == 0:
            continue
        out = model(input_ids=ids, labels=labels)
        total += float(out.loss) * t
        n += t
    return total / n, n


def parity(args):
    model = AutoModelForCausalLM.from_pretrained(f"{args.dir}/model", dtype=torch.float32, attn_implementation="sdpa").to(args.device)
    loss, n = heldout_loss(model, f"{args.dir}/heldout.jsonl", args.device)
    return {"system": "hf-parity", "loss": loss, "tokens": n}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("mode", choices=["pad", "flatten", "parity"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json")
    p.add_argument("--amp", action="store_true", help="fp32 weights and optimizer states, bf16 autocast")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (recompute each layer)")
    p.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (checking the script)")
    p.add_argument("--lora-r", type=int, help="train PEFT LoRA adapters of this rank on the frozen base")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 * r, as nopad's)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma-separated list of modules")
    p.add_argument("--use-rslora", action="store_true")
    p.add_argument("--init-adapter", help="start from this PEFT adapter (nopad bench --export DIR writes DIR/adapter)")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base through bitsandbytes (needs --lora-r)")
    args = p.parse_args()
    if args.load_in_4bit and not args.lora_r:
        p.error("--load-in-4bit trains adapters over the quantised base: give --lora-r")
    result = parity(args) if args.mode == "parity" else train(args)
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
