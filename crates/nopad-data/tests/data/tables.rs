//! Tabular input, Parquet and Arrow: rows become records (nested `messages` columns included),
//! errors name the row, `--columns` renames columns, a saved dataset's directory reads its files
//! in order (a DatasetDict's `train` split, or the one named), and a file that is not what it
//! claims, or is cut short, is said to be so. The fixtures and the script that wrote them
//! (pyarrow 26, datasets 5) are in `fixtures/`: each holds the same rows in every format, `chat`
//! a `list<struct<role, content>>` column and a string column, `qa` question/answer.

use std::path::{Path, PathBuf};

use nopad_data::{data_files, inspect_records, load_examples, parse_columns, LoadOptions};
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

/// The chat rows in every format: Parquet, an Arrow stream, an lz4 Feather (IPC file) and a
/// `save_to_disk` directory of two shards.
const CHAT: [&str; 4] = ["chat.parquet", "chat.arrow", "chat.feather", "chat_saved"];
/// The qa rows: Parquet, stream, Feather, a DatasetDict (its `train` split, by default and by
/// name).
const QA: [&str; 5] = [
    "qa.parquet",
    "qa.arrow",
    "qa.feather",
    "qa_dict",
    "qa_dict:train",
];

#[test]
fn rows_load_as_the_jsonl_records_they_hold() {
    let m = model_dir("tables-chat", chat_config(), true);
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
    let p = write(&temp_dir("tables-jsonl"), "d.jsonl", &jsonl);
    let (from_jsonl, _) = load_examples(&p, &opts(&m)).unwrap();
    assert!(from_jsonl.iter().all(|e| e.target_tokens() > 0));
    for name in CHAT {
        let (got, report) = load_examples(&fixture(name), &opts(&m)).unwrap();
        assert_eq!(report.records, 2, "{name}: {report}");
        assert_eq!(got, from_jsonl, "{name}");
    }
}

#[test]
fn columns_are_renamed_to_the_fields_a_format_reads() {
    let m = model_dir("tables-qa", chat_config(), true);
    let jsonl = "{\"prompt\": \"hello world\", \"completion\": \" bonjour\"}\n\
                 {\"prompt\": \"thanks\", \"completion\": \" bye\"}\n";
    let p = write(&temp_dir("tables-qa-jsonl"), "d.jsonl", jsonl);
    let (want, _) = load_examples(&p, &opts(&m)).unwrap();
    for name in QA {
        let mut o = opts(&m);
        // Without a mapping, question/answer is no known format: the error names the row.
        let e = load_examples(&fixture(name), &o).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{name}:1:")) && e.contains("cannot tell the record format"),
            "{e}"
        );
        o.columns = parse_columns("prompt=question,completion=answer").unwrap();
        let (got, _) = load_examples(&fixture(name), &o).unwrap();
        assert_eq!(got, want, "{name}");
        // A column the file lacks is named, with the ones it has.
        o.columns = parse_columns("prompt=query").unwrap();
        let e = load_examples(&fixture(name), &o).unwrap_err().to_string();
        assert!(
            e.contains("no column `query`") && e.contains("question, answer"),
            "{name}: {e}"
        );
    }
}

#[test]
fn a_saved_dataset_reads_its_files_in_order_and_its_splits_by_name() {
    let m = model_dir("tables-saved", chat_config(), true);
    let saved = fixture("chat_saved");
    let shards: Vec<PathBuf> = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
        .iter()
        .map(|f| saved.join(f))
        .collect();
    assert_eq!(data_files(&saved).unwrap(), shards);
    // Each shard alone is a stream of one row; the directory is both, in state.json's order.
    let (whole, _) = load_examples(&saved, &opts(&m)).unwrap();
    for (i, shard) in shards.iter().enumerate() {
        let (one, report) = load_examples(shard, &opts(&m)).unwrap();
        assert_eq!(report.records, 1);
        assert_eq!(one[0], whole[i]);
    }
    // The second row of a DatasetDict's test split is line 1 there.
    let mut o = opts(&m);
    o.columns = parse_columns("prompt=question,completion=answer").unwrap();
    let test = fixture("qa_dict:test");
    let view = inspect_records(&test, &o, 5).unwrap();
    assert_eq!(view.records.len(), 1);
    let (all, _) = load_examples(&fixture("qa_dict"), &o).unwrap();
    assert_eq!(view.records[0].example.as_ref().unwrap(), &all[1]);
    let e = load_examples(&fixture("qa_dict:valid"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("qa_dict: has no split `valid` (its splits: train, test)"),
        "{e}"
    );
    assert_eq!(
        data_files(&test).unwrap()[0],
        fixture("qa_dict/test/data-00000-of-00001.arrow")
    );
    let file = fixture("qa.arrow");
    assert_eq!(data_files(&file).unwrap(), [file]);
}

#[test]
fn a_dataset_cache_keys_a_directory_by_its_files() {
    let m = model_dir("tables-cache", chat_config(), true);
    let dir = temp_dir("tables-cache-data");
    let saved = dir.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    for f in [
        "state.json",
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ] {
        std::fs::copy(fixture("chat_saved").join(f), saved.join(f)).unwrap();
    }
    let mut o = opts(&m);
    o.dataset_cache = Some(dir.join("cache"));
    let (first, r1) = load_examples(&saved, &o).unwrap();
    let (second, r2) = load_examples(&saved, &o).unwrap();
    assert!(r1.cached.is_none() && r2.cached.is_some(), "{r1} / {r2}");
    assert_eq!(first, second);
    // Another shard's bytes are another key: the examples are tokenised again.
    std::fs::copy(
        fixture("chat_saved/data-00000-of-00002.arrow"),
        saved.join("data-00001-of-00002.arrow"),
    )
    .unwrap();
    let (third, r3) = load_examples(&saved, &o).unwrap();
    assert!(r3.cached.is_none(), "{r3}");
    assert_eq!(third, [first[0].clone(), first[0].clone()]);
}

#[test]
fn a_file_that_is_not_what_it_claims_is_said_to_be_so() {
    let dir = temp_dir("not-a-table");
    for (name, want) in [
        ("d.parquet", "not a Parquet file"),
        ("d.arrow", "not a readable Arrow IPC stream"),
        ("d.feather", "not a readable Arrow IPC stream (nor file)"),
    ] {
        let p = write(&dir, name, "{\"text\": \"hello\"}\n");
        let e = load_examples(&p, &LoadOptions::new(64))
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains(want), "{e}");
    }
    // By their first bytes, whatever their names: an Arrow stream named .jsonl is read as one.
    let m = model_dir("tables-magic", chat_config(), true);
    let renamed = dir.join("chat.jsonl");
    std::fs::copy(fixture("chat.arrow"), &renamed).unwrap();
    let (got, _) = load_examples(&renamed, &opts(&m)).unwrap();
    let (want, _) = load_examples(&fixture("chat.parquet"), &opts(&m)).unwrap();
    assert_eq!(got, want);
}

#[test]
fn a_truncated_arrow_file_is_an_error_naming_it() {
    let dir = temp_dir("truncated");
    let m = model_dir("tables-truncated", chat_config(), true);
    for name in ["chat.arrow", "chat.feather"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        // Cut inside the schema, inside the batch, and just before the end marker or footer.
        for cut in [40, bytes.len() / 2, bytes.len() - 8] {
            let p = dir.join(format!("cut-{cut}-{name}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_examples(&p, &opts(&m)).unwrap_err().to_string();
            let named = e.starts_with(&format!("{}: ", p.display()));
            let why = ["truncated", "not a readable", "cannot read the rows"];
            assert!(
                named && why.iter().any(|w| e.contains(w)),
                "{name} cut at {cut}: {e}"
            );
        }
    }
}
