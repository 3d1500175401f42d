//! LoRA through the binary: `train --lora-r` writes PEFT's files, `eval --adapter` gives the
//! loss of `merge`'s checkpoint (over a bf16 base, and over an NF4 one with `--base-dtype nf4`,
//! merged into the dequantised projections), and bad LoRA flags are errors naming the flag.

mod common;
use common::{args, dir_with, eval_on_cpu, nopad, ok, stderr};

fn loss(o: std::process::Output) -> f64 {
    let v: serde_json::Value = serde_json::from_str(ok(o).trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn eval_with_an_adapter_equals_eval_of_the_merged_model() {
    for base in ["bf16", "nf4"] {
        eval_with_an_adapter_over(base);
    }
}

fn eval_with_an_adapter_over(dtype: &str) {
    let (dir, data) = dir_with(
        "eval.jsonl",
        "{\"input_ids\": [1, 5, 9, 13, 2], \"labels\": [-100, -100, 9, 13, 2]}\n\
         {\"input_ids\": [1, 7, 7, 7, 7, 7, 2]}\n",
    );
    let (out, merged) = (dir.path().join("adapter"), dir.path().join("merged"));
    let train = "train --model tiny --steps 4 --max-len 32 --batch-size 4 --device cpu \
                 --no-progress --lr 0.05 --lora-r 4 --lora-dropout 0.1 --lora-targets q_proj,v_proj,down_proj --out";
    let bd = ["--base-dtype", dtype];
    ok(nopad(&args(
        train,
        &[&[out.to_str().unwrap()][..], &bd].concat(),
    )));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["lora_alpha"], 8.0, "alpha defaults to 2·r");
    let with = loss(eval_on_cpu(
        "tiny",
        &data,
        &format!("--json --adapter {} --base-dtype {dtype}", out.display()),
    ));
    let base = loss(eval_on_cpu("tiny", &data, "--json"));
    assert!(
        (with - base).abs() > 1e-4,
        "the adapter changed nothing: {with} vs {base}"
    );
    let m = "merge --model tiny --save-dtype f32 --adapter";
    ok(nopad(&args(
        m,
        &[
            out.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
            "--base-dtype",
            dtype,
        ],
    )));
    let merged_loss = loss(eval_on_cpu(merged.to_str().unwrap(), &data, "--json"));
    assert!(
        ((with - merged_loss) / with).abs() < 1e-5,
        "{dtype}: adapter {with} vs merged {merged_loss}"
    );
}

#[test]
fn bad_lora_flags_name_the_flag() {
    let run = |extra: &str| {
        stderr(&nopad(&args(
            &format!("train --model tiny --steps 1 --device cpu --no-progress {extra}"),
            &[],
        )))
    };
    let e = run("--lora-alpha 4");
    assert!(e.contains("--lora-r"), "{e}");
    let e = run("--lora-r 4 --lora-targets q_proj,qkv");
    assert!(e.contains("--lora-targets") && e.contains("qkv"), "{e}");
    let e = run("--lora-r 0");
    assert!(e.contains("rank"), "{e}");
    let e = run("--lora-r 4 --optim-in-backward");
    assert!(e.contains("optim-in-backward"), "{e}");
    let e = run("--base-dtype nf4");
    assert!(e.contains("--lora-r"), "{e}");
    let e = run("--lora-r 4 --base-dtype int4");
    assert!(e.contains("--base-dtype") && e.contains("int4"), "{e}");
    let help = ok(nopad(&["train", "--help"]));
    assert!(
        help.contains("--lora-r") && help.contains("Default: 2·R"),
        "{help}"
    );
}
