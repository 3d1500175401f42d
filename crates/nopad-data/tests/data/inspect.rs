//! `inspect_records`: the first records of a file as loading converts them, with the text their
//! ids come from and the trained text marked.

use nopad_data::{inspect_records, load_examples, Format, LoadOptions};
use serde_json::json;

use crate::formats::{chat_config, model_dir};
use crate::util::{temp_dir, write};

const MARK: (&str, &str) = ("[[", "]]");

fn opts(model: &std::path::Path) -> LoadOptions {
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(model.to_path_buf());
    o
}

#[test]
fn records_are_shown_as_loading_converts_them_with_the_trained_text_marked() {
    let m = model_dir("inspect", chat_config(), true);
    let chat = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]});
    let pc = json!({"prompt": "what is two plus two", "completion": " four"});
    let dir = temp_dir("inspect");
    let p = write(&dir, "d.jsonl", &format!("{chat}\n\n{chat}\n{chat}\n"));
    let all = inspect_records(&p, &opts(&m), 10).unwrap();
    assert_eq!(all.format, Some(Format::Messages));
    assert_eq!(
        all.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        [1, 3, 4]
    );
    // The examples are loading's own.
    let (loaded, _) = load_examples(&p, &opts(&m)).unwrap();
    for (r, e) in all.records.iter().zip(&loaded) {
        assert_eq!(r.example.as_ref().unwrap(), e);
    }
    let first = &all.records[0];
    assert_eq!(
        all.marked(first, MARK).unwrap(),
        "<s><|user|> hello<|end|>\n<|assistant|> [[bonjour<|end|>]]\n"
    );
    assert_eq!(all.token(15).as_deref(), Some("bonjour"));
    // -n: only the first records.
    assert_eq!(inspect_records(&p, &opts(&m), 2).unwrap().records.len(), 2);
    // Prompt/completion: BOS and EOS are ids of their own, written as their tokens.
    let plain = model_dir(
        "inspect-plain",
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
        false,
    );
    let p = write(&dir, "pc.jsonl", &format!("{pc}\n"));
    let view = inspect_records(&p, &opts(&plain), 1).unwrap();
    assert_eq!(
        view.marked(&view.records[0], MARK).unwrap(),
        "<s>what is two plus two [[four</s>]]"
    );
}

#[test]
fn bad_records_are_shown_with_their_error_and_pretokenized_ones_as_ids() {
    let m = model_dir("inspect-bad", chat_config(), false);
    let dir = temp_dir("inspect-bad");
    let mut bytes = b"{\"input_ids\": [1, 6, 7]}\nnot json\n{\"input_ids\": [1, 99]}\n".to_vec();
    bytes.extend_from_slice(b"\xff\n{\"input_ids\": [1, 6]}\n");
    let p = dir.join("d.jsonl");
    std::fs::write(&p, bytes).unwrap();
    let view = inspect_records(&p, &opts(&m), 5).unwrap();
    assert_eq!(view.format, Some(Format::Pretokenized));
    let lines: Vec<(usize, String)> = view
        .records
        .iter()
        .map(|r| {
            let what = match &r.example {
                Ok(e) => format!("{:?}", e.input_ids),
                Err(e) => e.to_string(),
            };
            (r.line, what)
        })
        .collect();
    let msg = |l: usize, s: &str| (l, format!("{}:{l}: {s}", p.display()));
    assert_eq!(lines[0], (1, "[1, 6, 7]".to_string()));
    assert!(
        lines[1].1.starts_with(&msg(2, "malformed JSON").1),
        "{lines:?}"
    );
    assert_eq!(
        lines[2],
        msg(
            3,
            "field `input_ids`: token id 99 at index 1 is not below the vocabulary size 27"
        )
    );
    assert!(
        lines[3].1.starts_with(&msg(4, "not valid UTF-8").1),
        "{lines:?}"
    );
    assert_eq!(lines[4], (5, "[1, 6]".to_string()));
    assert!(view.marked(&view.records[0], MARK).is_none());
    let p = write(&dir, "empty.jsonl", "\n\n");
    let e = inspect_records(&p, &opts(&m), 3).unwrap_err().to_string();
    assert!(e.contains("no records"), "{e}");
}
