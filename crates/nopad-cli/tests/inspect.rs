//! The data as training will see it, before any training: `nopad inspect`, and
//! `--chat-template FILE` on the commands that read data; Parquet and Arrow tables, which train
//! as the JSON Lines they hold.

use std::path::Path;

mod common;
use common::{args, nopad, ok, stderr, tiny_model, TOKENIZER};

/// The model's template: role markers, `</s>` after each assistant turn.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
<|user|> {{ m['content'] }}\n{% else %}<|assistant|> {{ m['content'] }}</s>\n{% endif %}{% endfor %}";

/// A model directory with the tokenizer files only (no weights: nothing here trains).
fn model(dir: &Path) -> String {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("tokenizer.json"), TOKENIZER).unwrap();
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true,
                                 "chat_template": TEMPLATE});
    std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    m.to_str().unwrap().to_string()
}

/// `dir/name` holding `text`, as a string for the command line.
fn file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]}"#;

#[test]
fn a_chat_template_file_replaces_the_models_on_stats_and_its_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let data = file(dir.path(), "chat.jsonl", &format!("{CHAT}\n"));
    let stats = |extra: &[&str]| {
        let mut more = vec!["--data", &data, "--model", &m];
        more.extend(extra);
        nopad(&args("stats --max-len 32 --batch-size 1 --json", &more))
    };
    let tokens = |o| {
        let j: serde_json::Value = serde_json::from_str(&ok(o)).unwrap();
        j["flatten"]["real_tokens"].as_u64().unwrap()
    };
    // <s> <|user|> hello <|assistant|> bonjour </s>; the file's template has no markers.
    assert_eq!(tokens(stats(&[])), 6);
    let plain = file(
        dir.path(),
        "plain.jinja",
        "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    );
    assert_eq!(tokens(stats(&["--chat-template", &plain])), 3);
    let broken = file(
        dir.path(),
        "broken.jinja",
        "{% for m in messages %}\n{{ m }\n",
    );
    let e = stderr(&stats(&["--chat-template", &broken]));
    assert!(
        e.contains(&format!("{broken}:2: the chat template does not parse")),
        "{e}"
    );
}

/// Runs `nopad inspect --model m --data data` with `line` (split at spaces) before them.
fn inspect(line: &str, m: &str, data: &str) -> std::process::Output {
    nopad(&args(line, &["--model", m, "--data", data]))
}

#[test]
fn inspect_shows_the_marked_text_the_ids_and_labels_and_what_training_would_report() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let lonely = r#"{"messages": [{"role": "user", "content": "hello"}]}"#;
    let data = file(
        dir.path(),
        "chat.jsonl",
        &format!("{CHAT}\nnot json\n{lonely}\n{CHAT}\n"),
    );
    let out = ok(inspect("inspect --skip-bad", &m, &data));
    assert!(out.contains(": format messages, max-len 4096"), "{out}");
    for want in [
        "record 1 (line 1): 6 tokens, 2 targets\n",
        "  | <s><|user|> hello\n  | <|assistant|> [[bonjour</s>]]\n",
        "       0        1     -100  \"<s>\"\n",
        "       4        6        6  \"bonjour\"\n",
        "       5        2        2  \"</s>\"\n",
        "record 2 (line 2): ",
        "malformed JSON",
        "record 3 (line 3): 3 tokens, 0 targets (no target token: training skips it)",
        "training would load: 4 records -> 2 examples (1 skipped, 0 truncated, 0 split, 0 dropped); \
         1 examples with no target tokens skipped",
        "  line 3: skipped: no target tokens",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        !out.contains("record 4"),
        "three records by default:\n{out}"
    );
    // -n, and a cut at --max-len shown where it falls.
    let out = ok(inspect("inspect --skip-bad -n 1 --max-len 5", &m, &data));
    assert!(!out.contains("record 2"), "{out}");
    assert!(
        out.contains(
            "6 tokens, 2 targets (longer than --max-len 5: truncated to its first 5 tokens)"
        ),
        "{out}"
    );
    let cut = "       4        6        6  \"bonjour\"\n  ------ --max-len 5 ------\n";
    assert!(out.contains(cut), "{out}");
    assert!(out.contains("2 truncated, 0 split, 0 dropped"), "{out}");
    // Without --skip-bad, training would stop at line 2: the records are shown, then why.
    let o = inspect("inspect", &m, &data);
    assert_eq!(o.status.code(), Some(2));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("record 1 (line 1)"), "{shown}");
    let e = stderr(&o);
    assert!(e.contains("training would stop: "), "{e}");
    assert!(e.contains("chat.jsonl:2: malformed JSON"), "{e}");
}

#[test]
fn inspect_takes_a_chat_template_file_and_the_loss_on_flag() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let data = file(dir.path(), "chat.jsonl", &format!("{CHAT}\n"));
    let plain = file(
        dir.path(),
        "plain.jinja",
        "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    );
    let out = ok(nopad(&args(
        "inspect",
        &["--model", &m, "--data", &data, "--chat-template", &plain],
    )));
    assert!(out.contains("  | <s>hello [[bonjour]] \n"), "{out}");
    let out = ok(inspect("inspect --loss-on all", &m, &data));
    let every = "  | <s>[[<|user|> hello\n  | <|assistant|> bonjour</s>]]\n";
    assert!(out.contains(every), "every token but BOS:\n{out}");
}

#[test]
fn a_dataset_cache_answers_the_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let data = file(dir.path(), "chat.jsonl", &format!("{CHAT}\n{CHAT}\n"));
    let cache = dir.path().join("cache");
    let run = || {
        let line = "inspect -n 1 --dataset-cache";
        ok(nopad(&args(
            line,
            &[cache.to_str().unwrap(), "--model", &m, "--data", &data],
        )))
    };
    let first = run();
    assert!(!first.contains("dataset cache"), "{first}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    let second = run();
    assert!(second.contains("2 examples (0 skipped"), "{second}");
    assert!(
        second.contains("; read from the dataset cache "),
        "{second}"
    );
}

/// `name` among nopad-data's tabular fixtures (written by pyarrow and `datasets`).
fn fixture(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nopad-data/tests/data/fixtures");
    dir.join(name).to_str().unwrap().to_string()
}

/// The rows every `chat` fixture holds, as JSON Lines.
const CHAT_ROWS: &str = r#"{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "bonjour"}], "source": "a"}
{"messages": [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "bye"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour world"}], "source": "b"}
"#;

/// A table trains exactly as its rows written as JSON Lines: the same losses from the Parquet
/// file, the Arrow stream, the Feather (IPC file) one and a saved dataset's directory, which
/// also gives the same statistics and evaluation, and `DIR:SPLIT` with `--columns` picks a DatasetDict's split.
#[test]
fn tables_train_as_the_jsonl_records_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(&dir.path().join("model"));
    let m = model(dir.path());
    let jsonl = file(dir.path(), "chat.jsonl", CHAT_ROWS);
    let losses = |data: &str, run: &str| -> Vec<f64> {
        let out = dir.path().join(run);
        let log = dir.path().join(format!("{run}.log"));
        let line = "train --steps 2 --batch-size 1 --max-len 32 --device cpu --no-progress";
        let (out, log) = (out.to_str().unwrap(), log.to_str().unwrap());
        let summary = ok(nopad(&args(
            line,
            &["--model", &m, "--data", data, "--out", out, "--log", log],
        )));
        assert!(summary.contains("2 examples"), "{run}: {summary}");
        let log = std::fs::read_to_string(log).unwrap();
        let step = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64();
        log.lines().map(|l| step(l).unwrap()).collect()
    };
    let want = losses(&jsonl, "jsonl");
    assert_eq!(want.len(), 2);
    for name in ["chat.parquet", "chat.arrow", "chat.feather", "chat_saved"] {
        assert_eq!(losses(&fixture(name), name), want, "{name}");
    }
    let saved = fixture("chat_saved");
    for (what, line) in [
        ("stats", "stats --max-len 32 --batch-size 1 --json"),
        ("eval", "eval --device cpu --max-len 32 --json"),
    ] {
        let on = |data: &str| ok(nopad(&args(line, &["--model", &m, "--data", data])));
        assert_eq!(on(&saved), on(&jsonl), "{what}");
    }
    let out = ok(inspect(
        "inspect --columns prompt=question,completion=answer",
        &m,
        &fixture("qa_dict:test"),
    ));
    assert!(
        out.contains("record 1 (line 1): 4 tokens, 2 targets\n  | <s>thanks [[bye</s>]]\n")
            && !out.contains("record 2"),
        "{out}"
    );
}
