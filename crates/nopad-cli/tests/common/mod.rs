//! What the binary's integration tests share: running `nopad` and reading what it printed.
// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `nopad` binary built for these tests, with no arguments yet.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nopad"))
}

/// Runs `nopad args` to its end.
pub fn nopad<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command()
        .args(args)
        .output()
        .expect("the nopad binary runs")
}

/// The arguments `line` spells (split at spaces), then `more` (paths and other values that may
/// hold spaces).
pub fn args(line: &str, more: &[&str]) -> Vec<String> {
    line.split_whitespace()
        .chain(more.iter().copied())
        .map(String::from)
        .collect()
}

/// Runs `nopad eval --device cpu <extra> --model <model> --data <data>` (`extra` split at spaces).
pub fn eval_on_cpu(model: &str, data: &Path, extra: &str) -> Output {
    let data = data.to_str().expect("test paths are UTF-8");
    nopad(&args(
        &format!("eval --device cpu {extra}"),
        &["--model", model, "--data", data],
    ))
}

/// Trains the tiny preset for one step into the model directory `out` (config and weights, no
/// tokenizer), for tests that need a model on disk.
pub fn tiny_model(out: &Path) {
    let out = out.to_str().expect("test paths are UTF-8");
    ok(nopad(&args(
        "train --model tiny --steps 1 --max-len 32 --batch-size 4 --device cpu --no-progress --out",
        &[out],
    )));
}

/// A temporary directory holding one file, `name`, with `text`; the directory lives as long as
/// the returned guard.
pub fn dir_with(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("the test file is written");
    (dir, path)
}

/// What the run printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run's stdout, after asserting that it succeeded (its stderr otherwise).
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "nopad failed:\n{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A word-level tokenizer (whitespace split), written out by hand: `<s>` 1, `</s>` 2, the
/// role markers `<|user|>` 3 and `<|assistant|>` 4, then words from 5.
pub const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
 "added_tokens": [
  {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
  {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
  {"id": 3, "content": "<|user|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
  {"id": 4, "content": "<|assistant|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
 "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
 "model": {"type": "WordLevel", "unk_token": "<unk>", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2,
  "<|user|>": 3, "<|assistant|>": 4, "hello": 5, "bonjour": 6, "thanks": 7, "bye": 8, "what": 9,
  "is": 10, "two": 11, "four": 12}}}"#;
