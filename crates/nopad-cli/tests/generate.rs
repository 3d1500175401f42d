//! Generation through the binary: `nopad generate` on the built-in presets (no download) with
//! ids, on a model directory with a tokenizer (text, a conversation, a prompts file), over a
//! LoRA adapter (equal to its merged model), bad flags named; and `train --sample-every`
//! writing sample records to the log without changing the training.

use std::path::Path;

mod common;
use common::{args, dir_with, nopad, ok, stderr, TOKENIZER};

/// The records `nopad generate --json` printed, one per prompt.
fn records(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn generate_json(extra: &[&str]) -> Vec<serde_json::Value> {
    records(&ok(nopad(&args("generate --device cpu --json", extra))))
}

#[test]
fn generate_on_the_demo_model_greedy_batched_and_sampled() {
    let one = |ids: &str| {
        generate_json(&[
            "--model",
            "small",
            "--prompt-ids",
            ids,
            "--max-new-tokens",
            "6",
        ])
    };
    let a = one("1,2,3");
    assert_eq!(a.len(), 1);
    let r = &a[0];
    assert_eq!(r["prompt_ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(r["ids"].as_array().unwrap().len(), 6, "{r}");
    assert_eq!(
        (r["stop"].as_str(), r["completion"].is_null()),
        (Some("length"), true)
    );
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(one("1,2,3")[0]["ids"], r["ids"], "greedy repeats");
    // Three prompts of different lengths decode together as they decode alone.
    let (dir, file) = dir_with(
        "prompts.jsonl",
        "{\"prompt_ids\": [7]}\n\n{\"prompt_ids\": [1, 2, 3]}\n{\"prompt_ids\": [9, 8, 7, 6, 5, 4]}\n",
    );
    let batch = generate_json(&[
        "--model",
        "small",
        "--prompts",
        file.to_str().unwrap(),
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[1]["ids"], r["ids"]);
    assert_eq!(batch[0]["ids"], one("7")[0]["ids"]);
    assert_eq!(batch[2]["ids"], one("9,8,7,6,5,4")[0]["ids"]);
    // Sampling: the same seed, the same tokens; another seed, others.
    let sampled = |seed: &str| {
        generate_json(&[
            "--model",
            "small",
            "--prompts",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.2",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
        .iter()
        .map(|r| r["ids"].clone())
        .collect::<Vec<_>>()
    };
    assert_eq!(sampled("4"), sampled("4"));
    assert_ne!(sampled("4"), sampled("5"));
    // Plain output: the ids of a model without a tokenizer, one block per prompt.
    let text = ok(nopad(&args(
        "generate --device cpu --model tiny --max-new-tokens 3 --prompts",
        &[file.to_str().unwrap()],
    )));
    assert_eq!(text.matches("=== prompt").count(), 3, "{text}");
    drop(dir);
}

#[test]
fn bad_generate_flags_are_named() {
    let (dir, file) = dir_with("p.jsonl", "{\"prompt_ids\": [1]}\n{\"prompt\": 3}\n");
    let g = "generate --device cpu --model tiny";
    let prompts = format!("--prompts {}", file.display());
    let bad_line = format!("{}:2: field `prompt`: expected a string", file.display());
    for (flags, want) in [
        (prompts.as_str(), bad_line.as_str()),
        (
            "--prompt-ids 1,x",
            "invalid value 'x' for '--prompt-ids <1,2,3>'",
        ),
        (
            "--prompt-ids 1,500",
            "token id 500 is outside the model's vocabulary of 97",
        ),
        ("--prompt hello", "no tokenizer.json"),
        ("--prompt-ids 1 --temperature=-1", "--temperature -1"),
        ("--prompt-ids 1 --top-p 1.5", "--top-p 1.5"),
        ("--prompt-ids 1 --prompt x", "cannot be used with"),
        (
            "--prompt-ids 1 --base-dtype nf4",
            "--base-dtype applies to the base under --adapter",
        ),
        (
            "--messages [{}]",
            "message 0 needs a string `role` and `content`",
        ),
    ] {
        let e = stderr(&nopad(&args(&format!("{g} {flags}"), &[])));
        assert!(e.contains(want), "{flags}: {e}");
    }
    let train = "train --model tiny --steps 1 --device cpu";
    for (flags, want) in [
        ("--sample-every 2".to_string(), "--sample-prompts"),
        (
            format!("--sample-every 0 {prompts}").replace("--prompts", "--sample-prompts"),
            "`sample-every`: must be at least 1",
        ),
    ] {
        let e = stderr(&nopad(&args(&format!("{train} {flags}"), &[])));
        assert!(e.contains(want), "{flags}: {e}");
    }
    drop(dir);
}

/// Role markers; the generation prompt opens an assistant turn.
const TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> \
{{ m['content'] }} {% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// The tiny preset's weights (after one step) saved as a model directory, with the tokenizer.
fn model_dir(dir: &Path) -> String {
    let m = dir.join("model");
    ok(nopad(&args(
        "train --model tiny --steps 1 --batch-size 2 --max-len 16 --synthetic-examples 8 \
         --device cpu --no-progress --out",
        &[m.to_str().unwrap()],
    )));
    std::fs::write(m.join("tokenizer.json"), TOKENIZER).unwrap();
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true,
                                 "chat_template": TEMPLATE});
    std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    m.to_str().unwrap().to_string()
}

#[test]
fn text_conversations_and_adapters_through_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let gen = |more: &[&str]| {
        let mut a = vec!["--model", m.as_str(), "--max-new-tokens", "5"];
        a.extend(more);
        generate_json(&a)
    };
    // tokenizer("hello bye") with its BOS; the completion decoded from the ids.
    let r = &gen(&["--prompt", "hello bye"])[0];
    assert_eq!(r["prompt_ids"], serde_json::json!([1, 5, 8]));
    assert_eq!(r["prompt"], "hello bye");
    let ids = r["ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 5, "{r}");
    assert!(r["completion"].is_string(), "{r}");
    // </s> (config.json's eos) ends a sequence and is its last token.
    if r["stop"] == "eos" {
        assert_eq!(ids.last().unwrap(), 2);
    }
    let same = &gen(&["--prompt-ids", "1,5,8"])[0];
    assert_eq!(same["ids"], r["ids"]);
    // A conversation, rendered with the generation prompt: <s> <|user|> hello <|assistant|>.
    let chat = r#"[{"role": "user", "content": "hello"}]"#;
    let c = &gen(&["--messages", chat])[0];
    assert_eq!(c["prompt_ids"], serde_json::json!([1, 3, 5, 4]));
    let file = dir.path().join("chat.json");
    std::fs::write(&file, format!("{{\"messages\": {chat}}}")).unwrap();
    assert_eq!(
        gen(&["--messages", file.to_str().unwrap()])[0]["ids"],
        c["ids"]
    );
    let text = ok(nopad(&args(
        "generate --device cpu --max-new-tokens 5 --model",
        &[&m, "--prompt", "hello bye"],
    )));
    assert_eq!(text.trim_end(), r["completion"].as_str().unwrap());
    // An adapter on top generates what its merged model generates.
    let (ad, merged) = (dir.path().join("adapter"), dir.path().join("merged"));
    ok(nopad(&args(
        "train --steps 3 --batch-size 2 --max-len 16 --synthetic-examples 8 --lr 0.05 --lora-r 4 \
         --device cpu --no-progress --model",
        &[&m, "--out", ad.to_str().unwrap()],
    )));
    ok(nopad(&args(
        "merge --save-dtype f32 --model",
        &[
            &m,
            "--adapter",
            ad.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
    )));
    let over = gen(&["--prompt", "hello bye", "--adapter", ad.to_str().unwrap()]);
    let mut a = vec!["--model", merged.to_str().unwrap(), "--max-new-tokens", "5"];
    a.extend(["--prompt-ids", "1,5,8"]);
    assert_eq!(over[0]["ids"], generate_json(&a)[0]["ids"]);
}

/// The `loss` of every step line of a JSON log.
fn losses(log: &str) -> Vec<f64> {
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

#[test]
fn train_with_sample_every_logs_samples_and_trains_the_same() {
    let (dir, prompts) = dir_with(
        "p.jsonl",
        "{\"prompt_ids\": [1, 2]}\n{\"prompt_ids\": [5, 4, 3]}\n",
    );
    let run = |log: &str, samples: bool| {
        let log = dir.path().join(log);
        let mut more = vec!["--log".to_string(), log.display().to_string()];
        if samples {
            more.extend(
                [
                    "--sample-every",
                    "2",
                    "--sample-max-new-tokens",
                    "4",
                    "--sample-prompts",
                ]
                .map(String::from),
            );
            more.push(prompts.display().to_string());
        }
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        let o = nopad(&args(
            "train --model tiny --steps 5 --batch-size 4 --max-len 32 --synthetic-examples 32 \
             --device cpu --no-progress",
            &more,
        ));
        let e = stderr(&o);
        ok(o);
        (std::fs::read_to_string(log).unwrap(), e)
    };
    let (with, e) = run("with.jsonl", true);
    let (without, _) = run("without.jsonl", false);
    assert_eq!(
        losses(&with),
        losses(&without),
        "sampling changed the training"
    );
    let recs: Vec<serde_json::Value> = with
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("samples").is_some())
        .collect();
    // After steps 2 and 4, and after the last (5).
    let steps: Vec<u64> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 5]);
    for r in &recs {
        let s = r["samples"].as_array().unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1]["prompt"], serde_json::json!([5, 4, 3]));
        assert_eq!(s[1]["ids"].as_array().unwrap().len(), 4);
        assert!(s[1]["completion"].is_null() && s[1]["stop"] == "length");
    }
    assert!(e.contains("step 4 sample 1: ids ["), "{e}");
    assert!(
        e.contains("samples (KV cache)"),
        "the plan names the samples: {e}"
    );
}
