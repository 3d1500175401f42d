//! Ids against HF with a real tokenizer: Mistral 7B v0.1's SentencePiece vocabulary (32,000
//! pieces, byte fallback) in the Hub's Llama 2 shape, with Mistral Instruct's chat template.
//! `fixtures/mistral-spm/record.py` wrote the tokenizer and recorded what HF gives for each
//! record (`expected.jsonl`): TRL's ids and labels for prompt/completion records and
//! `apply_chat_template` ids for conversations.

use std::path::PathBuf;

use serde_json::Value;

use crate::fidelity::{hf, load};

const N: i32 = -100;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/mistral-spm")
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

fn expected() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture().join("expected.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn prompt_completion_records_give_trls_ids_and_labels() {
    let dir = fixture();
    let mut seen = 0;
    for rec in expected()
        .iter()
        .filter(|r| r["record"].get("prompt").is_some())
    {
        let got = load(&dir, rec["record"].clone());
        let what = &rec["record"];
        assert_eq!(got.input_ids, ints(&rec["input_ids"]), "ids of {what}");
        assert_eq!(got.labels, ints(&rec["labels"]), "labels of {what}");
        seen += 1;
    }
    assert_eq!(seen, 11);
}

#[test]
fn conversations_give_the_ids_of_apply_chat_template_and_train_only_the_replies() {
    let dir = fixture();
    let tok = hf(&dir);
    let mut seen = 0;
    for rec in expected()
        .iter()
        .filter(|r| r["record"].get("messages").is_some())
    {
        let got = load(&dir, rec["record"].clone());
        let what = &rec["record"];
        assert_eq!(got.input_ids, ints(&rec["input_ids"]), "ids of {what}");
        // The trained tokens, run by run, decode to the assistant replies and their EOS, plus
        // the separator this template writes inside the assistant turn after the EOS (`' '`).
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for (i, &l) in got.labels.iter().enumerate() {
            if l == N {
                continue;
            }
            assert_eq!(l, got.input_ids[i], "{what}: a label is its own token");
            match runs.last_mut() {
                Some(r) if i > 0 && got.labels[i - 1] != N => r.push(l as u32),
                _ => runs.push(vec![l as u32]),
            }
        }
        let replies: Vec<&str> = what["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "assistant")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(runs.len(), replies.len(), "{what}: one trained run a reply");
        for (run, reply) in runs.iter().zip(&replies) {
            let text = tok.decode(run, false).unwrap();
            let body = text
                .trim_end()
                .strip_suffix("</s>")
                .unwrap_or_else(|| panic!("{what}: trained run {text:?} does not end with EOS"));
            assert_eq!(body.trim(), reply.trim(), "{what}");
        }
        seen += 1;
    }
    assert_eq!(seen, 3);
}

#[test]
fn the_fixture_is_the_real_vocabulary_with_byte_fallback() {
    let tok = hf(&fixture());
    assert_eq!(tok.get_vocab_size(true), 32000);
    // A character outside the vocabulary falls back to its UTF-8 bytes.
    let enc = tok.encode("🦙", false).unwrap();
    assert_eq!(
        enc.get_tokens(),
        ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    );
}
