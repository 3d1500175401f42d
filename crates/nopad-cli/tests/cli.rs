//! The `nopad` binary as a user runs it: train → checkpoint → eval, logs, and the errors a user
//! can cause (each must name the key, file or line).

use std::path::Path;

mod common;
use common::{args, dir_with, eval_on_cpu, nopad, ok, stderr, tiny_model};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn train_saves_a_checkpoint_that_eval_reads_with_any_batching() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt");
    let log = dir.path().join("log.jsonl");
    let summary = ok(nopad(&args(
        "train --model tiny --steps 3 --max-len 32 --batch-size 4 --device cpu --no-progress",
        &[
            "--out",
            out.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ],
    )));
    assert!(
        summary.contains("strategy flatten: 3 steps") && summary.contains("loss "),
        "{summary}"
    );
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let keys = "step loss lr grad_norm tokens_per_s target_tokens_per_s padding_fraction";
    for key in keys.split(' ') {
        assert!(
            lines[2].get(key).is_some_and(|v| v.is_number()),
            "log line lacks {key}: {}",
            lines[2]
        );
    }
    let data = dir.path().join("eval.jsonl");
    write(
        &data,
        "{\"input_ids\": [1, 5, 9, 13, 2], \"labels\": [-100, -100, 9, 13, 2]}\n\
         {\"input_ids\": [1, 7, 7, 7, 7, 7, 2]}\n\
         {\"input_ids\": [1, 40, 41, 42], \"labels\": [-100, -100, -100, 42]}\n",
    );
    let eval = |extra: &str| -> serde_json::Value {
        let o = eval_on_cpu(out.to_str().unwrap(), &data, &format!("--json {extra}"));
        serde_json::from_str(ok(o).trim()).unwrap()
    };
    let base = eval("");
    // Targets: 3 (first example) + 6 (second, labels default to input_ids) + 1 (third).
    assert_eq!(base["tokens"], 10);
    let l0 = base["loss"].as_f64().unwrap();
    assert!(l0.is_finite() && l0 > 0.0);
    for extra in [
        "--strategy pad --batch-size 1",
        "--strategy pad --batch-size 3",
        "--batch-size 2",
    ] {
        let r = eval(extra);
        assert_eq!(r["tokens"], 10);
        let l = r["loss"].as_f64().unwrap();
        assert!(((l - l0) / l0).abs() < 1e-5, "{extra:?}: {l} vs {l0}");
    }
}

#[test]
fn config_files_are_merged_and_bad_keys_or_values_are_named() {
    let (_dir, cfg) = dir_with(
        "run.toml",
        "model = \"tiny\"\nsteps = 2\nmax-len = 32\nbatch-size = 2\nno-progress = true\n",
    );
    let out = ok(nopad(&args(
        "train --device cpu --strategy pad --config",
        &[cfg.to_str().unwrap()],
    )));
    assert!(out.contains("strategy pad: 2 steps"), "{out}");
    // The optimizer-state modes, as TOML keys and as flags.
    write(
        &cfg,
        "model = \"tiny\"\nsteps = 2\nmax-len = 32\nbatch-size = 2\nno-progress = true\n\
         optim-states = \"8bit\"\nmaster-weights = \"none\"\n",
    );
    ok(nopad(&args(
        "train --device cpu --config",
        &[cfg.to_str().unwrap()],
    )));
    let e = stderr(&nopad(&["train", "--optim-states", "4bit"]));
    assert!(
        e.contains("`optim-states`: 4bit is not f32, bf16 or 8bit"),
        "{e}"
    );
    let e = stderr(&nopad(&["train", "--master-weights", "bf16"]));
    assert!(
        e.contains("`master-weights`: bf16 is not f32 or none"),
        "{e}"
    );
    // The optimizer offloaded to the host, as a TOML key; a part that cannot be offloaded is
    // named.
    write(
        &cfg,
        "model = \"tiny\"\nsteps = 2\nmax-len = 32\nbatch-size = 2\nno-progress = true\n\
         offload = \"optimizer\"\n",
    );
    ok(nopad(&args(
        "train --device cpu --config",
        &[cfg.to_str().unwrap()],
    )));
    // Activations too, in a list (the tiny preset has 2 layers: 3 is refused, naming both).
    write(
        &cfg,
        "model = \"tiny\"\nsteps = 2\nmax-len = 32\nbatch-size = 2\nno-progress = true\n\
         offload = \"activations:2, optimizer\"\n",
    );
    ok(nopad(&args(
        "train --device cpu --config",
        &[cfg.to_str().unwrap()],
    )));
    let e = stderr(&nopad(&args(
        "train --device cpu --offload activations:3 --config",
        &[cfg.to_str().unwrap()],
    )));
    assert!(
        e.contains("activations:3") && e.contains("only 2 layers"),
        "{e}"
    );
    let e = stderr(&nopad(&["train", "--offload", "params"]));
    assert!(
        e.contains("`offload`: `params` is not `optimizer` or `activations:K`"),
        "{e}"
    );

    write(&cfg, "model = \"tiny\"\nbatch_sise = 2\n");
    let e = stderr(&nopad(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(e.contains("run.toml") && e.contains("batch_sise"), "{e}");

    write(&cfg, "strategy = \"zigzag\"\n");
    let e = stderr(&nopad(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(e.contains("`strategy`: unknown strategy `zigzag`"), "{e}");

    write(&cfg, "batch-size = \"eight\"\n");
    let e = stderr(&nopad(&["train", "--config", cfg.to_str().unwrap()]));
    assert!(e.contains("run.toml") && e.contains("batch-size"), "{e}");

    let e = stderr(&nopad(&["train", "--batch-size", "0"]));
    assert!(e.contains("`batch-size`: must be at least 1"), "{e}");
    let e = stderr(&nopad(&["train", "--model", "llama-9b"]));
    assert!(
        e.contains("`llama-9b` is neither a directory nor a preset") && e.contains("llama-3.2-1b"),
        "{e}"
    );
    let e = stderr(&nopad(&["train", "--device", "tpu"]));
    assert!(e.contains("`device`: unknown device `tpu`"), "{e}");
}

#[test]
fn bad_data_and_bad_models_are_reported_with_their_place() {
    let (dir, data) = dir_with(
        "d.jsonl",
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 200, 3]}\n",
    );
    let e = stderr(&eval_on_cpu("tiny", &data, ""));
    assert!(e.contains("d.jsonl:2") && e.contains("input_ids"), "{e}");

    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    write(&model.join("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, \"intermediate_size\": 8, \"num_hidden_layers\": 1, \"num_attention_heads\": 3}");
    write(&data, "{\"input_ids\": [1, 2, 3]}\n");
    let e = stderr(&eval_on_cpu(model.to_str().unwrap(), &data, ""));
    assert!(e.contains("config.json: field `head_dim`"), "{e}");
}

/// A user's whole path with text data: a model directory with its own tokenizer and chat
/// template, chat records trained on, the same records through `nopad stats` and `nopad eval`.
#[test]
fn chat_data_through_a_model_directory_with_its_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let m = model.to_str().unwrap();
    ok(nopad(&args(
        "train --model tiny --steps 1 --max-len 32 --device cpu --no-progress --out",
        &[m],
    )));
    let data = dir.path().join("chat.jsonl");
    let mut lines = String::new();
    for (u, a) in [
        ("hi there", "hi how are you"),
        ("how are you", "fine thanks"),
        ("bye", "see ya"),
        ("good day", "good day"),
        ("hi", "bye"),
    ] {
        lines += &serde_json::json!({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}).to_string();
        lines.push('\n');
    }
    write(&data, &lines);
    let d = data.to_str().unwrap();
    // The preset's checkpoint has no tokenizer: the error says so and names the directory.
    let e = stderr(&nopad(&args(
        "stats --max-len 32 --batch-size 2",
        &["--data", d, "--model", m],
    )));
    assert!(
        e.contains(&format!("the model directory {m} has no tokenizer.json")),
        "{e}"
    );
    // Word-level tokenizer: ids 0-4 special, then words; all below the tiny preset's 97.
    let words = [
        "hi", "there", "how", "are", "you", "fine", "thanks", "bye", "see", "ya", "good", "day",
    ];
    let specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(words.iter())
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    write(&model.join("tokenizer.json"), &tok.to_string());
    let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} {% else %}<|assistant|> {{ m['content'] }}</s> {% endif %}{% endfor %}";
    write(
        &model.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
            .to_string(),
    );
    let out2 = dir.path().join("ft");
    let summary = ok(nopad(&args(
        "train --steps 3 --batch-size 2 --max-len 32 --device cpu --no-progress",
        &["--model", m, "--data", d, "--out", out2.to_str().unwrap()],
    )));
    assert!(
        summary.contains("5 examples") && summary.contains("loss "),
        "{summary}"
    );
    // --chat-template replaces the model's template (here: no </s> after the answers), and
    // --dataset-cache makes the second identical run read the tokenised examples back.
    let alt = dir.path().join("alt.jinja");
    write(
        &alt,
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} {% else %}<|assistant|> {{ m['content'] }} {% endif %}{% endfor %}",
    );
    let cache = dir.path().join("cache");
    let with_template = |out: &str| {
        let out = dir.path().join(out);
        nopad(&args(
            "train --steps 1 --batch-size 2 --max-len 32 --device cpu --no-progress",
            &[
                "--model",
                m,
                "--data",
                d,
                "--chat-template",
                alt.to_str().unwrap(),
                "--dataset-cache",
                cache.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        ))
    };
    // The load report is among the summary's notes, on stdout.
    let first = ok(with_template("t1"));
    assert!(!first.contains("read from the dataset cache"), "{first}");
    let second = ok(with_template("t2"));
    assert!(second.contains("read from the dataset cache"), "{second}");
    // Without </s> the assistant turns hold 11 target words instead of 16 tokens.
    let e = ok(eval_on_cpu(
        out2.to_str().unwrap(),
        &data,
        &format!("--json --chat-template {}", alt.display()),
    ));
    let e: serde_json::Value = serde_json::from_str(e.trim()).unwrap();
    assert_eq!(e["tokens"], 11, "{e}");
    let stats: serde_json::Value = serde_json::from_str(&ok(nopad(&args(
        "stats --max-len 32 --batch-size 2 --json",
        &["--data", d, "--model", m],
    ))))
    .unwrap();
    for s in ["pad", "concat", "flatten", "offline"] {
        let keys = "rows steps_per_epoch real_tokens pad_tokens padding_fraction sum_len_sq \
                    predicted_speedup";
        for k in keys.split_whitespace() {
            assert!(stats[s].get(k).is_some(), "stats.{s} lacks {k}: {stats}");
        }
    }
    assert_eq!(stats["pad"]["real_tokens"], stats["flatten"]["real_tokens"]);
    // The assistant turns are the targets: 4+2+2+2+1 words plus </s> after each = 16.
    let e = ok(eval_on_cpu(out2.to_str().unwrap(), &data, "--json"));
    let e: serde_json::Value = serde_json::from_str(e.trim()).unwrap();
    assert_eq!(e["tokens"], 16, "{e}");
    // --loss-on all: every token but each example's first (BOS), 40 - 5.
    let e = ok(eval_on_cpu(m, &data, "--json --loss-on all"));
    let e: serde_json::Value = serde_json::from_str(e.trim()).unwrap();
    assert_eq!(e["tokens"], 35, "{e}");
    let e = stderr(&eval_on_cpu(m, &data, "--loss-on completion"));
    assert!(
        e.contains("--loss-on completion does not apply to records in format `messages`"),
        "{e}"
    );
    let stats = ok(nopad(&args(
        "stats --max-len 32 --batch-size 2 --json --loss-on all",
        &["--data", d, "--model", m],
    )));
    assert!(stats.contains("real_tokens"), "{stats}");
    let bad = nopad(&args("train --loss-on prompt --data", &[d, "--model", m]));
    assert!(
        stderr(&bad).contains("`loss-on`: unknown loss-on `prompt`"),
        "{}",
        stderr(&bad)
    );
    // bench --export writes a model directory HF loads with its tokenizer, as train --out does.
    let export = dir.path().join("export");
    ok(nopad(&args(
        "bench --steps 1 --warmup 0 --strategies flatten --batch-size 2 --max-len 32 --device cpu",
        &[
            "--model",
            m,
            "--data",
            d,
            "--out",
            dir.path().join("bench").to_str().unwrap(),
            "--export",
            export.to_str().unwrap(),
        ],
    )));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(export.join(f)).unwrap(),
            std::fs::read(model.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `nopad stats` on the built-in length distributions; flatten packs the same tokens as pad with
/// no padding, and the precision and recompute flags reject bad values by name.
#[test]
fn stats_on_synthetic_data_and_flag_errors() {
    let stats: serde_json::Value = serde_json::from_str(&ok(nopad(&args(
        "stats --data synthetic-orcamath --examples 300 --max-len 2048 --batch-size 8 --json",
        &[],
    ))))
    .unwrap();
    assert_eq!(stats["pad"]["real_tokens"], stats["flatten"]["real_tokens"]);
    assert_eq!(stats["flatten"]["pad_tokens"], 0, "{stats}");
    assert!(stats["pad"]["pad_tokens"].as_u64().unwrap() > 0, "{stats}");
    let bad = nopad(&["train", "--model", "tiny", "--grad-dtype", "f16"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("grad-dtype"), "{}", stderr(&bad));
    let bad = nopad(&["bench", "--model", "tiny", "--recompute", "mlp:x"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("mlp:K"), "{}", stderr(&bad));
}

/// Without a terminal (as under nohup, Slurm or CI) a run prints its settings before step 1 and a
/// plain line every --log-every steps, with no progress-bar escape codes; a warm-up longer than
/// the run is reported.
#[test]
fn a_run_without_a_terminal_logs_plain_lines() {
    let o = nopad(&args(
        "train --model tiny --steps 4 --log-every 2 --max-len 32 --batch-size 4 --device cpu",
        &[],
    ));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    for want in [
        "settings:",
        "batch 4 × accum 1, max-len 32",
        "4 steps (",
        "4 warm-up steps",
        "warm-up of 10 steps is longer than the run's 4",
    ] {
        assert!(e.contains(want), "{want} not in {e}");
    }
    let steps: Vec<&str> = e.lines().filter(|l| l.contains(": loss ")).collect();
    assert_eq!(steps.len(), 2, "{e}");
    assert!(steps[0].starts_with("nopad: step 2/4: loss "), "{e}");
    assert!(
        steps[1].contains("lr ") && steps[1].contains("grad norm ") && steps[1].contains("tok/s")
    );
    assert!(!e.contains('\x1b'), "escape codes in {e:?}");
}

/// `--model org/name` is found in the Hugging Face cache (`HF_HUB_CACHE`), never downloaded; an
/// id that is not there names the folder it looked for and how to fetch it.
#[test]
fn a_hub_id_is_a_snapshot_of_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("made");
    tiny_model(&made);
    let cache = tmp.path().join("hub");
    let snap = cache.join("models--acme--tiny-llama/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("models--acme--tiny-llama/refs")).unwrap();
    std::fs::write(cache.join("models--acme--tiny-llama/refs/main"), "abc123").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(made.join(f), snap.join(f)).unwrap();
    }
    let run = |id: &str| {
        common::command()
            .args(args(
                "train --steps 1 --max-len 32 --batch-size 4 --device cpu --no-progress --model",
                &[id],
            ))
            .env("HF_HUB_CACHE", &cache)
            .output()
            .unwrap()
    };
    let o = run("acme/tiny-llama");
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("snapshots/abc123"), "{e}");
    // stats reads the snapshot's config.json for the memory plan.
    let o = common::command()
        .args(args(
            "stats --data synthetic-flan --examples 8 --max-len 32 --batch-size 2 --gpu-memory 24 --model",
            &["acme/tiny-llama"],
        ))
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("memory plan"));
    let o = run("acme/other");
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("models--acme--other") && e.contains("huggingface-cli download acme/other"),
        "{e}"
    );
}

/// `--gpus N` starts N workers of the same command with torchrun's variables; a worker that
/// fails (here: every one, since ranks of a multi-process run need GPUs and --device cpu says
/// otherwise) stops the run with the failed rank named, its last lines quoted, and its status.
#[test]
fn gpus_launches_workers_and_reports_the_one_that_failed() {
    let o = nopad(&args(
        "train --gpus 2 --model tiny --steps 1 --max-len 32 --batch-size 4 --device cpu --no-progress",
        &[],
    ));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("starting 2 workers"), "{e}");
    assert!(e.contains("rank ") && e.contains("failed"), "{e}");
    assert!(e.contains("use --ranks N in one process"), "{e}");
}

/// A model with `dynamic` RoPE trains within its max_position_embeddings (where HF's dynamic
/// NTK is plain RoPE) and refuses a longer --max-len, naming both.
#[test]
fn dynamic_rope_trains_within_the_models_context() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    tiny_model(&m);
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
    cfg["max_position_embeddings"] = serde_json::json!(24);
    write(&cfg_path, &cfg.to_string());
    let run = |max_len: &str| {
        nopad(&args(
            "train --steps 1 --batch-size 4 --device cpu --no-progress --model",
            &[m.to_str().unwrap(), "--max-len", max_len],
        ))
    };
    ok(run("24"));
    let e = stderr(&run("32"));
    assert!(
        e.contains("`max-len` 32") && e.contains("max_position_embeddings (24)"),
        "{e}"
    );
}
