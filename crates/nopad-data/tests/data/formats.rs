//! Golden tests for the text formats with a tokenizer and chat template the test writes itself
//! (a word-level vocabulary, so the expected ids can be read off by eye), and the located errors
//! of bad text records.

use std::path::{Path, PathBuf};

use nopad_data::{load_examples, Example, Format, LoadOptions, LossOn, ModelTokenizer};
use serde_json::json;

use crate::util::{temp_dir, write};

const N: i32 = -100;
const WORDS: [&str; 14] = [
    "hello", "world", "what", "is", "two", "plus", "four", "thanks", "bye", "bonjour", "say", "in",
    "french", "x",
];
const SPECIALS: [&str; 6] = [
    "<unk>",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];
/// Ids 20..: ChatML markers (added tokens, like every `<...>` entry) and their words.
const MORE: [&str; 7] = [
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "final",
    "helpful",
];

/// The test template: BOS, role headers, `<|end|>` after each turn; `.strip()` exercises the
/// Python-method compatibility and `raise_exception` HF's error function.
pub(crate) const TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
<|user|> {{ m['content'].strip() }}<|end|>\n{% elif m['role'] == 'assistant' %}\
<|assistant|> {{ m['content'] }}<|end|>\n{% else %}{{ raise_exception('unknown role ' + \
m['role']) }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}";

/// Writes `tokenizer.json` (word level, whitespace split; ids 0-5 specials, then WORDS) and a
/// `tokenizer_config.json` built from `config`; `post_bos` adds a post-processor that prepends
/// `<s>`, as Llama 3's does.
pub(crate) fn model_dir(name: &str, config: serde_json::Value, post_bos: bool) -> PathBuf {
    let dir = temp_dir(name);
    let all = || {
        SPECIALS
            .iter()
            .chain(WORDS.iter())
            .chain(MORE.iter())
            .enumerate()
    };
    let vocab: serde_json::Map<String, serde_json::Value> =
        all().map(|(i, w)| (w.to_string(), json!(i))).collect();
    let added: Vec<_> = all()
        .filter(|(_, s)| s.starts_with('<'))
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let post = if post_bos {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                        {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}})
    } else {
        serde_json::Value::Null
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": post, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    write(&dir, "tokenizer.json", &tok.to_string());
    write(&dir, "tokenizer_config.json", &config.to_string());
    dir
}

pub(crate) fn chat_config() -> serde_json::Value {
    json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true,
           "chat_template": TEMPLATE})
}

pub(crate) fn load_one(
    model: &Path,
    format: Option<Format>,
    record: serde_json::Value,
) -> Result<Example, String> {
    load_one_with(model, format, None, record)
}

/// [`load_one`] with `--loss-on`.
pub(crate) fn load_one_with(
    model: &Path,
    format: Option<Format>,
    loss_on: Option<LossOn>,
    record: serde_json::Value,
) -> Result<Example, String> {
    let dir = temp_dir("records");
    let p = write(&dir, "d.jsonl", &format!("{record}\n"));
    let mut o = LoadOptions::new(64);
    o.format = format;
    o.loss_on = loss_on;
    o.tokenizer_dir = Some(model.to_path_buf());
    load_examples(&p, &o)
        .map(|(mut ex, _)| ex.remove(0))
        .map_err(|e| e.to_string())
}

/// Each record, alone in `d.jsonl`, fails with its message at line 1 (the format is detected,
/// messages when nothing says).
pub(crate) fn assert_located_errors<const K: usize>(
    model: &Path,
    cases: [(serde_json::Value, &str); K],
) {
    for (record, want) in cases {
        let format = Format::detect(record.as_object().unwrap()).or(Some(Format::Messages));
        let msg = load_one(model, format, record.clone())
            .err()
            .unwrap_or_else(|| panic!("{record}: no error"));
        assert!(
            msg.contains(&format!("d.jsonl:1: {want}")),
            "{record}\n  got:  {msg}\n  want: {want}"
        );
    }
}

pub(crate) fn golden(model: &Path, record: serde_json::Value, ids: &[i32], labels: &[i32]) {
    let e = load_one(model, None, record.clone()).unwrap_or_else(|e| panic!("{record}: {e}"));
    assert_eq!(e.input_ids, ids, "ids of {record}");
    assert_eq!(e.labels, labels, "labels of {record}");
}

#[test]
fn text_and_prompt_completion_golden() {
    let m = model_dir(
        "plain",
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
        false,
    );
    let (hello, qa) = (&[1, 6, 7, 2][..], &[1, 8, 9, 10, 11, 10, 12, 2][..]);
    let qa_labels = &[N, N, N, N, N, N, 12, 2][..];
    for (record, ids, labels) in [
        (json!({"text": "hello world"}), hello, &[N, 6, 7, 2][..]),
        // Special tokens written in the text are not doubled.
        (
            json!({"text": "<s> hello world </s>"}),
            hello,
            &[N, 6, 7, 2][..],
        ),
        // Prompt masked; completion and EOS trained. The two are one text, as TRL joins them
        // (so the completion brings its own leading space).
        (
            json!({"prompt": "what is two plus two", "completion": " four"}),
            qa,
            qa_labels,
        ),
        // No chat template: alpaca becomes prompt "instruction\ninput\n" + completion.
        (
            json!({"instruction": "what is", "input": "two plus two", "output": "four"}),
            qa,
            qa_labels,
        ),
    ] {
        golden(&m, record, ids, labels);
    }
    let tok = ModelTokenizer::load(&m).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.vocab_size()),
        (Some(1), Some(2), 27)
    );
}

#[test]
fn bos_follows_the_config_or_the_post_processor() {
    let none = model_dir(
        "nobos",
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}),
        true,
    );
    golden(&none, json!({"text": "hello"}), &[6, 2], &[6, 2]);
    let post = model_dir(
        "postbos",
        json!({"bos_token": "<s>", "eos_token": "</s>"}),
        true,
    );
    assert!(ModelTokenizer::load(&post).unwrap().adds_bos());
    golden(&post, json!({"text": "hello"}), &[1, 6, 2], &[N, 6, 2]);
}

#[test]
fn chat_template_trains_only_assistant_turns_and_their_end_tokens() {
    let m = model_dir("chat", chat_config(), true);
    let conv = json!({"messages": [
        {"role": "user", "content": "  hello world "},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"}]});
    // The template writes BOS; add_bos_token must not add a second one.
    golden(
        &m,
        conv,
        &[1, 3, 6, 7, 5, 4, 15, 5, 3, 13, 5, 4, 14, 5],
        &[N, N, N, N, N, N, 15, 5, N, N, N, N, 14, 5],
    );
    golden(
        &m,
        json!({"instruction": "what is", "input": "two plus two", "output": "four"}),
        &[1, 3, 8, 9, 10, 11, 10, 5, 4, 12, 5],
        &[N, N, N, N, N, N, N, N, N, 12, 5],
    );
    // A template without an `add_generation_prompt` branch: the assistant header is still
    // masked, the content and the end-of-turn tokens are trained.
    let mut cfg = chat_config();
    cfg["chat_template"] = json!(TEMPLATE.replace(
        "{% if add_generation_prompt %}<|assistant|> {% endif %}",
        ""
    ));
    let m3 = model_dir("chat-nogen", cfg, false);
    golden(
        &m3,
        json!({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}]}),
        &[1, 3, 6, 5, 4, 14, 5],
        &[N, N, N, N, N, 14, 5],
    );
    // A template without `{{ bos_token }}` gets BOS from add_bos_token, once.
    let mut cfg = chat_config();
    cfg["chat_template"] = json!(TEMPLATE.replace("{{ bos_token }}", ""));
    let m2 = model_dir("chat-nobos", cfg, false);
    golden(
        &m2,
        json!({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}]}),
        &[1, 3, 6, 5, 4, 14, 5],
        &[N, N, N, N, N, 14, 5],
    );
}

#[test]
fn bad_text_records_name_line_and_field() {
    let m = model_dir("badtext", chat_config(), false);
    let cases = [
        (json!({"messages": "hi"}), "field `messages`: expected an array, found a string"),
        (json!({"messages": [{"role": "user"}]}), "field `messages[0].content`: missing"),
        (json!({"messages": [{"role": "user", "content": 3}]}), "field `messages[0].content`: expected a string or a list of text parts, found an integer"),
        (json!({"messages": [7]}), "field `messages[0]`: expected an object, found an integer"),
        (json!({"messages": []}), "field `messages`: empty conversation"),
        (json!({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "x"}]}),
         "field `messages[0].role`: unknown role `robot` (expected system, user, assistant or tool)"),
        (json!({"text": ""}), "field `text`: empty string"),
        (json!({"text": 5}), "field `text`: expected a string, found an integer"),
        (json!({"prompt": "x", "completion": null}), "field `completion`: expected a string, found null"),
        (json!({"instruction": "x", "input": ["y"], "output": "x"}), "field `input`: expected a string, found an array"),
    ];
    assert_located_errors(&m, cases);
    // A conversation with no assistant turn has nothing to train: skipped and counted, or an
    // error naming the line under strict.
    let dir = temp_dir("noassistant");
    let p = write(
        &dir,
        "d.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"bye\"}]}\n",
    );
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(m.clone());
    let (ex, report) = load_examples(&p, &o).unwrap();
    assert_eq!((ex.len(), report.no_targets), (1, 1));
    o.strict = true;
    let msg = load_examples(&p, &o).unwrap_err().to_string();
    assert!(msg.contains("d.jsonl:1"), "{msg}");
    // A vocabulary check applies to tokenized formats too (the tokenizer's size by default).
    let dir = temp_dir("vocab");
    let p = write(&dir, "d.jsonl", "{\"input_ids\": [1, 27]}\n");
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(m.clone());
    let msg = load_examples(&p, &o).unwrap_err().to_string();
    assert!(msg.contains("d.jsonl:1: field `input_ids`: token id 27 at index 1 is not below the vocabulary size 27"), "{msg}");
    // Text without a tokenizer is fatal even with --skip-bad: every record would fail.
    let p = write(&dir, "t.jsonl", "{\"text\": \"hello\"}\n");
    let mut o = LoadOptions::new(64);
    o.skip_bad = true;
    let msg = load_examples(&p, &o).unwrap_err().to_string();
    assert!(
        msg.contains("t.jsonl: records are in format `text`, which needs the model's tokenizer"),
        "{msg}"
    );
    // A template that does not parse is named in the config file.
    let mut cfg = chat_config();
    cfg["chat_template"] = json!("{% for m in messages %}");
    let broken = model_dir("broken", cfg, false);
    let msg = ModelTokenizer::load(&broken).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer_config.json: field `chat_template`: does not parse"),
        "{msg}"
    );
}

/// A ChatML-style template of our own: default system turn, `namespace`, `loop.first`, `trim`,
/// whitespace control; no BOS.
pub(crate) const CHATML: &str = "{%- set ns = namespace(sys=false) -%}{%- for m in messages -%}\
{%- if m['role'] == 'system' %}{% set ns.sys = true %}{% endif -%}\
{%- if loop.first and not ns.sys -%}<|im_start|>system\nhelpful<|im_end|>\n{% endif -%}\
<|im_start|>{{ m.role }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor -%}\
{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}";

#[test]
fn chatml_style_template_masks_system_user_and_headers() {
    let cfg = json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": CHATML});
    let m = model_dir("chatml", cfg, false);
    golden(
        &m,
        json!({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " bonjour "}]}),
        &[20, 22, 26, 21, 20, 23, 6, 21, 20, 24, 15, 21],
        &[N, N, N, N, N, N, N, N, N, N, 15, 21],
    );
}

#[test]
fn templates_that_rewrite_earlier_turns_are_located_or_rejected() {
    let conv = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "bye"}]});
    // The header of the last turn is longer than the generation prompt (" final"): the trained
    // span starts at the content, so the extra header word stays masked.
    let mut cfg = chat_config();
    cfg["chat_template"] = json!(TEMPLATE.replace(
        "<|assistant|> {{ m['content'] }}",
        "<|assistant|>{% if loop.last %} final{% endif %} {{ m['content'] }}"
    ));
    let m = model_dir("rewrite-header", cfg, false);
    golden(
        &m,
        conv.clone(),
        &[1, 3, 6, 5, 4, 15, 5, 3, 13, 5, 4, 25, 14, 5],
        &[N, N, N, N, N, 15, 5, N, N, N, N, N, 14, 5],
    );
    // Content rewritten in earlier turns cannot be located: a located error, never a silent
    // wrong mask.
    let mut cfg = chat_config();
    cfg["chat_template"] = json!(TEMPLATE.replace(
        "{{ m['content'] }}",
        "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'] | upper }}{% endif %}"
    ));
    let m = model_dir("rewrite-content", cfg, false);
    let msg = load_one(&m, None, conv).unwrap_err();
    assert!(msg.contains("d.jsonl:1: field `messages`: chat template failed to render: cannot locate assistant message 1"), "{msg}");
}
