//! Parquet input: rows become records (nested `messages` columns included), errors name the row,
//! `--columns` renames columns, and a file that is not Parquet is said to be so. The fixtures were
//! written by pyarrow 26 (snappy, as HF `datasets` writes them): `chat.parquet` holds a
//! `list<struct<role, content>>` column and a string column, `qa.parquet` question/answer.

use std::path::{Path, PathBuf};

use nopad_data::{load_examples, parse_columns, LoadOptions};
use serde_json::json;

use crate::formats::{chat_config, model_dir};
use crate::util::{temp_dir, write};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fixtures")
        .join(name)
}

fn opts(model: &Path) -> LoadOptions {
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(model.to_path_buf());
    o
}

#[test]
fn parquet_rows_load_as_the_jsonl_records_they_hold() {
    let m = model_dir("parquet-chat", chat_config(), true);
    let (from_parquet, report) = load_examples(&fixture("chat.parquet"), &opts(&m)).unwrap();
    assert_eq!(report.records, 2, "{report}");
    let jsonl: String = [
        json!({"messages": [{"role": "user", "content": "hello world"},
                            {"role": "assistant", "content": "bonjour"}], "source": "a"}),
        json!({"messages": [{"role": "user", "content": "thanks"},
                            {"role": "assistant", "content": "bye"},
                            {"role": "user", "content": "hello"},
                            {"role": "assistant", "content": "bonjour world"}], "source": "b"}),
    ]
    .iter()
    .map(|r| format!("{r}\n"))
    .collect();
    let p = write(&temp_dir("parquet-jsonl"), "d.jsonl", &jsonl);
    let (from_jsonl, _) = load_examples(&p, &opts(&m)).unwrap();
    assert_eq!(from_parquet, from_jsonl);
    assert!(from_parquet.iter().all(|e| e.target_tokens() > 0));
}

#[test]
fn columns_are_renamed_to_the_fields_a_format_reads() {
    let m = model_dir("parquet-qa", chat_config(), true);
    let mut o = opts(&m);
    // Without a mapping, question/answer is no known format: the error names the row.
    let e = load_examples(&fixture("qa.parquet"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("qa.parquet:1:") && e.contains("cannot tell the record format"),
        "{e}"
    );
    o.columns = parse_columns("prompt=question,completion=answer").unwrap();
    let (got, _) = load_examples(&fixture("qa.parquet"), &o).unwrap();
    let jsonl = "{\"prompt\": \"hello world\", \"completion\": \" bonjour\"}\n\
                 {\"prompt\": \"thanks\", \"completion\": \" bye\"}\n";
    let p = write(&temp_dir("parquet-qa-jsonl"), "d.jsonl", jsonl);
    let (want, _) = load_examples(&p, &opts(&m)).unwrap();
    assert_eq!(got, want);
    // A column the file lacks is named, with the ones it has.
    o.columns = parse_columns("prompt=query").unwrap();
    let e = load_examples(&fixture("qa.parquet"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no column `query`") && e.contains("question, answer"),
        "{e}"
    );
    assert!(parse_columns("prompt").unwrap_err().contains("NEW=OLD"));
}

#[test]
fn a_file_that_is_not_parquet_is_said_to_be_so() {
    let p = write(
        &temp_dir("not-parquet"),
        "d.parquet",
        "{\"text\": \"hello\"}\n",
    );
    let e = load_examples(&p, &LoadOptions::new(64))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.parquet") && e.contains("not a Parquet file"),
        "{e}"
    );
}
