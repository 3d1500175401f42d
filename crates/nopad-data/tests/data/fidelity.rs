//! Ids and labels as HF and TRL make them, with tokenizers built here by the `tokenizers` crate
//! in the shapes real models ship: Llama 2's SentencePiece BPE (a `Prepend("▁")` normalizer, no
//! pre-tokenizer), Mistral's (a Metaspace pre-tokenizer, `prepend_scheme: first`) and Llama 3's
//! byte-level BPE (a ByteLevel post-processor that trims offsets, BOS from a template).
//! TRL's reference is computed here the way its SFT trainer does it: `tokenizer(prompt)` and
//! `tokenizer(prompt + completion + eos_token)`, the first `len(prompt_ids)` tokens masked.

use std::path::PathBuf;

use nopad_data::{load_examples, Example, LoadOptions};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::sequence::Sequence as Processors;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, Tokenizer};

use crate::util::{temp_dir, write};

const N: i32 = -100;

/// The tokenizer shapes under test.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Shape {
    /// Llama 2: `Prepend("▁")` and `Replace(" ", "▁")` normalizers, no pre-tokenizer.
    Llama2,
    /// Mistral: a Metaspace pre-tokenizer that prepends `▁` to the first piece.
    Metaspace,
    /// Llama 3: byte-level BPE, BOS added by a template after a ByteLevel post-processor.
    Llama3,
}

/// Words each shape's vocabulary holds whole (BPE merges them left to right).
const WORDS: [&str; 14] = [
    "Q",
    ":",
    "hi",
    "there",
    "user",
    "assistant",
    "hello",
    "bonjour",
    "thanks",
    "bye",
    "th",
    "ere",
    "\n",
    "\n\n",
];

/// Llama 3's specials, in id order after `<unk>`.
const LLAMA3_SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// A word as the model's vocabulary spells it: with the `▁` or `Ġ` of a preceding space, and
/// byte-level characters for Llama 3.
fn spelled(shape: Shape, word: &str) -> String {
    match shape {
        Shape::Llama2 | Shape::Metaspace => word.replace(' ', "▁"),
        Shape::Llama3 => word.replace(' ', "Ġ").replace('\n', "Ċ"),
    }
}

/// Builds the tokenizer of `shape` with the `tokenizers` crate and writes it, with a
/// tokenizer_config.json, to a fresh model directory.
pub(crate) fn model(shape: Shape, name: &str) -> PathBuf {
    let specials: Vec<&str> = match shape {
        Shape::Llama2 | Shape::Metaspace => vec!["<unk>", "<s>", "</s>"],
        Shape::Llama3 => std::iter::once("<unk>").chain(LLAMA3_SPECIALS).collect(),
    };
    // Each word alone and after a space; every prefix is a token, merged left to right.
    let words: Vec<String> = WORDS
        .iter()
        .flat_map(|w| [format!(" {w}"), w.to_string()])
        .chain([" ".to_string()])
        .map(|w| spelled(shape, &w))
        .collect();
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut merges = vec![];
    for w in &words {
        let chars: Vec<char> = w.chars().collect();
        for k in 0..chars.len() {
            let piece: String = chars[..=k].iter().collect();
            if k > 0 {
                let pair = (chars[..k].iter().collect(), chars[k].to_string());
                if !merges.contains(&pair) {
                    merges.push(pair);
                }
            }
            for t in [chars[k].to_string(), piece] {
                if !tokens.contains(&t) {
                    tokens.push(t);
                }
            }
        }
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(bpe);
    let bos = specials[1];
    let template = TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .unwrap()
        .special_tokens(vec![(bos, 1)])
        .build()
        .unwrap();
    match shape {
        Shape::Llama2 => {
            let norm = Normalizers::new(vec![
                Prepend::new("▁".into()).into(),
                Replace::new(" ", "▁").unwrap().into(),
            ]);
            tok.with_normalizer(Some(norm)).unwrap();
            tok.with_post_processor(Some(template));
        }
        Shape::Metaspace => {
            tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)));
            tok.with_post_processor(Some(template));
        }
        Shape::Llama3 => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevel::default()));
            let post: Vec<PostProcessorWrapper> =
                vec![ByteLevel::new(false, true, true).into(), template.into()];
            tok.with_post_processor(Some(Processors::new(post)));
        }
    }
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(added).unwrap();
    let dir = temp_dir(name);
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let cfg = match shape {
        Shape::Llama2 | Shape::Metaspace => {
            json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true})
        }
        // No add_bos_token: BOS comes from the post-processor, as Llama 3 ships it.
        Shape::Llama3 => json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    };
    write(&dir, "tokenizer_config.json", &cfg.to_string());
    dir
}

/// The model's tokenizer as HF loads it (post-processor included).
pub(crate) fn hf(dir: &std::path::Path) -> Tokenizer {
    Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

fn ids(enc: &tokenizers::Encoding) -> Vec<i32> {
    enc.get_ids().iter().map(|&i| i as i32).collect()
}

/// Token strings of `ids`.
pub(crate) fn tokens(tok: &Tokenizer, ids: &[i32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.id_to_token(i as u32).unwrap())
        .collect()
}

/// TRL's SFT example of a prompt/completion record: ids of `prompt + completion + eos_token`,
/// the first `len(tokenizer(prompt))` of them masked.
fn trl(tok: &Tokenizer, eos: &str, prompt: &str, completion: &str) -> Example {
    let n_prompt = tok.encode(prompt, true).unwrap().len();
    let full = tok
        .encode(format!("{prompt}{completion}{eos}"), true)
        .unwrap();
    let input_ids = ids(&full);
    let mut labels = input_ids.clone();
    labels[..n_prompt].fill(N);
    Example { input_ids, labels }
}

/// The one example `record` gives under `dir`'s tokenizer.
pub(crate) fn load(dir: &std::path::Path, record: serde_json::Value) -> Example {
    let data = temp_dir("fidelity-data");
    let p = write(&data, "d.jsonl", &format!("{record}\n"));
    let mut o = LoadOptions::new(256);
    o.tokenizer_dir = Some(dir.to_path_buf());
    load_examples(&p, &o)
        .unwrap_or_else(|e| panic!("{record}: {e}"))
        .0
        .remove(0)
}

fn eos_of(shape: Shape) -> &'static str {
    match shape {
        Shape::Llama2 | Shape::Metaspace => "</s>",
        Shape::Llama3 => "<|eot_id|>",
    }
}

#[test]
fn prompt_completion_ids_and_mask_are_trls_for_every_tokenizer_shape() {
    let cases = [
        // The usual spelling: the completion brings its space.
        ("Q: hi", " there"),
        // A prompt ending in a space: the space and the completion's first word are one token,
        // which starts in the prompt and is masked, as TRL masks it.
        ("Q: hi ", "there"),
        // A line break between them.
        ("Q: hi\n", "there"),
        // A word cut in two: the token holding both halves belongs to the prompt.
        ("Q: hi th", "ere"),
        // No prompt: everything but BOS is trained.
        ("", "hi there"),
    ];
    for shape in [Shape::Llama2, Shape::Metaspace, Shape::Llama3] {
        let dir = model(shape, "pc");
        let tok = hf(&dir);
        for (prompt, completion) in cases {
            let got = load(&dir, json!({"prompt": prompt, "completion": completion}));
            let want = trl(&tok, eos_of(shape), prompt, completion);
            let what = format!("{shape:?} {prompt:?} + {completion:?}");
            assert_eq!(got.input_ids, want.input_ids, "ids of {what}");
            assert_eq!(got.labels, want.labels, "labels of {what}");
            // The joined text, tokenised once: what HF's tokenizer gives for it.
            let joined = tok.encode(format!("{prompt}{completion}"), true).unwrap();
            assert_eq!(got.input_ids[..got.len() - 1], ids(&joined), "{what}");
            assert!(got.target_tokens() > 0, "{what}");
        }
    }
}

#[test]
fn a_sentencepiece_completion_gets_no_leading_meta_space_of_its_own() {
    for shape in [Shape::Llama2, Shape::Metaspace] {
        let dir = model(shape, "spm");
        let tok = hf(&dir);
        // The fixture has the defect's cause: a text tokenised alone gets a `▁` prepended, so a
        // completion tokenised apart from its prompt starts with a `▁` the joined text lacks.
        let alone = tok.encode("there", false).unwrap();
        assert_eq!(alone.get_tokens(), ["▁there"], "{shape:?}");
        let e = load(&dir, json!({"prompt": "Q: hi\n", "completion": "there"}));
        assert_eq!(
            tokens(&tok, &e.input_ids),
            ["<s>", "▁Q", ":", "▁hi", "\n", "there", "</s>"],
            "{shape:?}"
        );
        // The mask starts exactly at the completion.
        let there = tok.token_to_id("there").unwrap() as i32;
        assert_eq!(e.labels, [N, N, N, N, N, there, 2], "{shape:?}");
        let e = load(&dir, json!({"prompt": "Q: hi", "completion": " there"}));
        assert_eq!(
            tokens(&tok, &e.input_ids),
            ["<s>", "▁Q", ":", "▁hi", "▁there", "</s>"],
            "{shape:?}"
        );
        assert_eq!(e.labels[4..], e.input_ids[4..], "{shape:?}");
        assert_eq!(e.labels[..4], [N; 4], "{shape:?}");
        // Alpaca without a chat template: prompt "instruction\n", completion the output.
        let a = load(&dir, json!({"instruction": "Q: hi", "output": "there"}));
        let want = trl(&tok, "</s>", "Q: hi\n", "there");
        assert_eq!((a.input_ids, a.labels), (want.input_ids, want.labels));
    }
}

#[test]
fn a_byte_level_tokenizer_that_trims_offsets_masks_as_trl_does() {
    let dir = model(Shape::Llama3, "bytelevel");
    let tok = hf(&dir);
    // Its post-processor moves a token's leading space out of the token's span: " there"
    // reports bytes 6..11 of "Q: hi there", though its first byte, the space, is the prompt's.
    let trimmed = tok.encode("Q: hi there", false).unwrap();
    assert_eq!(trimmed.get_tokens()[3], "Ġthere");
    assert_eq!(trimmed.get_offsets()[3], (6, 11));
    let e = load(&dir, json!({"prompt": "Q: hi ", "completion": "there"}));
    assert_eq!(
        tokens(&tok, &e.input_ids),
        ["<|begin_of_text|>", "Q", ":", "Ġhi", "Ġthere", "<|eot_id|>"]
    );
    assert_eq!(e.labels, [N, N, N, N, N, e.input_ids[5]]);
}

/// Llama 3.0's original template: the assistant header follows every conversation, with or
/// without `add_generation_prompt`.
pub(crate) const LLAMA30: &str = "{% set loop_messages = messages %}{% for message in \
loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + \
'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}\
{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

/// A Llama 3-shaped model directory whose tokenizer_config.json carries `template`.
pub(crate) fn llama3_chat(name: &str, template: &str) -> PathBuf {
    let dir = model(Shape::Llama3, name);
    let cfg = json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                     "chat_template": template});
    write(&dir, "tokenizer_config.json", &cfg.to_string());
    dir
}

/// The tokens of `e` that are targets.
fn targets(tok: &Tokenizer, e: &Example) -> Vec<String> {
    let trained: Vec<i32> = e.labels.iter().copied().filter(|&l| l != N).collect();
    tokens(tok, &trained)
}

#[test]
fn a_template_that_always_appends_the_header_renders_as_hf_and_masks_as_trl() {
    let dir = llama3_chat("llama30", LLAMA30);
    let tok = hf(&dir);
    let turn = |role: &str, text: &str| {
        format!("<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
    };
    let header = "<|start_header_id|>assistant<|end_header_id|>\n\n";
    // One turn: the header after the answer is in the ids (HF renders it) but no target.
    let one = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]});
    let e = load(&dir, one);
    let text = format!(
        "<|begin_of_text|>{}{}{header}",
        turn("user", "hello"),
        turn("assistant", "bonjour")
    );
    assert_eq!(e.input_ids, ids(&tok.encode(text, false).unwrap()));
    assert_eq!(targets(&tok, &e), ["bonjour", "<|eot_id|>"]);
    // The stray header ends the ids, masked.
    let names = tokens(&tok, &e.input_ids);
    let last_eot = names.iter().rposition(|t| t == "<|eot_id|>").unwrap();
    let tail = &names[last_eot + 1..];
    assert_eq!(
        tail[..3],
        ["<|start_header_id|>", "assistant", "<|end_header_id|>"]
    );
    assert!(e.labels[last_eot + 1..].iter().all(|&l| l == N));
    // Several turns: each answer and its end of turn; no header, user turn or stray header.
    let many = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": " bye "}]});
    let e = load(&dir, many);
    let text = format!(
        "<|begin_of_text|>{}{}{}{}{header}",
        turn("user", "hello"),
        turn("assistant", "bonjour"),
        turn("user", "thanks"),
        turn("assistant", "bye")
    );
    assert_eq!(e.input_ids, ids(&tok.encode(text, false).unwrap()));
    assert_eq!(
        targets(&tok, &e),
        ["bonjour", "<|eot_id|>", "bye", "<|eot_id|>"]
    );
}

#[test]
fn text_a_template_writes_before_every_conversation_is_no_trailer() {
    // It ignores `add_generation_prompt` too, and an empty conversation renders to its system
    // turn, which ends as every turn does: that end stays in the assistant's turn.
    let template = "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nhello<|eot_id|>\
{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
{{ m['content'] }}<|eot_id|>{% endfor %}";
    let dir = llama3_chat("preamble", template);
    let e = load(
        &dir,
        json!({"messages": [
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "bonjour"}]}),
    );
    assert_eq!(targets(&hf(&dir), &e), ["bonjour", "<|eot_id|>"]);
}
