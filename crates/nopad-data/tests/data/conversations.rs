//! ShareGPT records and content given as text parts (both the same example as the plain
//! `messages` record they spell), unknown roles, `--loss-on` per format, a model directory
//! without tokenizer.json, and a chat template file given in place of the model's.

use nopad_data::{load_examples, Format, LoadOptions, LossOn};
use serde_json::json;

use crate::formats::{
    assert_located_errors, chat_config, golden, load_one, load_one_with, model_dir, CHATML,
};
use crate::util::{temp_dir, write};

const N: i32 = -100;

/// The ChatML-style template of formats.rs takes a system turn; the test template refuses one.
fn chatml_dir(name: &str) -> std::path::PathBuf {
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'] | trim }}\
<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let cfg = json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": template});
    model_dir(name, cfg, false)
}

#[test]
fn sharegpt_records_are_the_messages_they_spell() {
    let m = model_dir("sharegpt", chat_config(), true);
    let share = json!({"conversations": [
        {"from": "human", "value": "hello world"}, {"from": "gpt", "value": "bonjour"},
        {"from": "user", "value": "thanks"}, {"from": "assistant", "value": "bye"}]});
    assert_eq!(
        Format::detect(share.as_object().unwrap()),
        Some(Format::ShareGpt)
    );
    golden(
        &m,
        share,
        &[1, 3, 6, 7, 5, 4, 15, 5, 3, 13, 5, 4, 14, 5],
        &[N, N, N, N, N, N, 15, 5, N, N, N, N, 14, 5],
    );
    // A system turn: masked, as in a messages record.
    let c = chatml_dir("sharegpt-system");
    let share = json!({"conversations": [
        {"from": "system", "value": "helpful"}, {"from": "human", "value": "hello"},
        {"from": "gpt", "value": "bonjour"}]});
    let msgs = json!({"messages": [
        {"role": "system", "content": "helpful"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"}]});
    let (ids, labels) = (
        [20, 22, 26, 21, 20, 23, 6, 21, 20, 24, 15, 21],
        [N, N, N, N, N, N, N, N, N, N, 15, 21],
    );
    golden(&c, share.clone(), &ids, &labels);
    golden(&c, msgs, &ids, &labels);
    assert_eq!("sharegpt".parse::<Format>(), Ok(Format::ShareGpt));
    let forced = load_one(&c, Some(Format::ShareGpt), share).unwrap();
    assert_eq!(forced.input_ids, ids);
}

#[test]
fn content_as_text_parts_is_the_joined_text() {
    let m = model_dir("parts", chat_config(), true);
    let parts = json!({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "bonjour"}]}]});
    let plain = json!({"messages": [
        {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "bonjour"}]});
    let a = load_one(&m, None, parts).unwrap();
    let b = load_one(&m, None, plain).unwrap();
    assert_eq!((&a.input_ids, &a.labels), (&b.input_ids, &b.labels));
    assert_eq!(a.input_ids, [1, 3, 6, 7, 5, 4, 15, 5]);
}

#[test]
fn bad_turns_name_the_line_the_field_and_what_is_expected() {
    let m = model_dir("badturns", chat_config(), false);
    let user = |content: serde_json::Value| json!({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]});
    let cases = [
        (user(json!([{"type": "image_url", "image_url": {"url": "x"}}])),
         "field `messages[0].content[0]`: part of type `image_url` is not supported (only `text` parts are)"),
        (user(json!([{"type": "text", "text": "x"}, "x"])),
         "field `messages[0].content[1]`: expected a text part object, found a string"),
        (user(json!([{"type": "text", "text": 3}])),
         "field `messages[0].content[0].text`: missing or not a string"),
        (user(json!([{"text": "x"}])), "field `messages[0].content[0].type`: missing or not a string"),
        (json!({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "x"}]}),
         "field `messages[1].role`: unknown role `bot` (expected system, user, assistant or tool)"),
        (json!({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "x"}]}),
         "field `conversations[1].from`: unknown role `bot` (expected human, gpt, system, user or assistant)"),
        (json!({"conversations": [{"from": "human"}]}), "field `conversations[0].value`: missing"),
        (json!({"conversations": [{"value": "x"}]}), "field `conversations[0].from`: missing"),
        (json!({"conversations": {"from": "human"}}), "field `conversations`: expected an array, found an object"),
        (json!({"conversations": []}), "field `conversations`: empty conversation"),
    ];
    assert_located_errors(&m, cases);
    // The line is the record's own, not the first.
    let dir = temp_dir("badrole-line");
    let good = r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]}"#;
    let p = write(
        &dir,
        "d.jsonl",
        &format!("{good}\n{}\n", good.replace("\"user\"", "\"human\"")),
    );
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(m);
    let msg = load_examples(&p, &o).unwrap_err().to_string();
    assert!(
        msg.contains("d.jsonl:2: field `messages[0].role`: unknown role `human`"),
        "{msg}"
    );
}

#[test]
fn loss_on_picks_the_targets_and_refuses_what_the_format_cannot_mean() {
    let m = model_dir("losson", chat_config(), true);
    let conv = json!({"messages": [
        {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "bonjour"}]});
    let ids = [1, 3, 6, 7, 5, 4, 15, 5];
    let load = |loss: Option<LossOn>, record: &serde_json::Value| {
        load_one_with(&m, None, loss, record.clone())
    };
    // The format's default is what --loss-on names it.
    assert_eq!(load(None, &conv), load(Some(LossOn::Assistant), &conv));
    let all = load(Some(LossOn::All), &conv).unwrap();
    assert_eq!(all.input_ids, ids);
    assert_eq!(all.labels, [N, 3, 6, 7, 5, 4, 15, 5]);
    let plain = model_dir(
        "losson-plain",
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
        false,
    );
    let pc = json!({"prompt": "what is two plus two", "completion": " four"});
    let alpaca = json!({"instruction": "what is", "input": "two plus two", "output": "four"});
    let one = |loss, record: &serde_json::Value| load_one_with(&plain, None, loss, record.clone());
    let completion = [N, N, N, N, N, N, 12, 2];
    assert_eq!(one(None, &pc).unwrap().labels, completion);
    assert_eq!(
        one(Some(LossOn::Completion), &pc).unwrap().labels,
        completion
    );
    // Alpaca's output is its completion (no template here) and its assistant turn alike.
    for l in [None, Some(LossOn::Completion), Some(LossOn::Assistant)] {
        assert_eq!(one(l, &alpaca).unwrap().labels, completion, "{l:?}");
    }
    let every = [N, 8, 9, 10, 11, 10, 12, 2];
    assert_eq!(one(Some(LossOn::All), &pc).unwrap().labels, every);
    assert_eq!(one(Some(LossOn::All), &alpaca).unwrap().labels, every);
    // Pretokenized: `all` trains every token whatever the labels say.
    let tokens = json!({"input_ids": [1, 6, 7], "labels": [N, N, 7]});
    assert_eq!(one(None, &tokens).unwrap().labels, [N, N, 7]);
    assert_eq!(one(Some(LossOn::All), &tokens).unwrap().labels, [1, 6, 7]);
    // A value the format cannot mean: a whole-file error, even under --skip-bad.
    let text = json!({"text": "hello world"});
    for (record, loss, format, accepted) in [
        (
            &pc,
            LossOn::Assistant,
            "prompt-completion",
            "completion, all",
        ),
        (&conv, LossOn::Completion, "messages", "assistant, all"),
        (&text, LossOn::Completion, "text", "all"),
        (&tokens, LossOn::Assistant, "pretokenized", "all"),
    ] {
        let dir = temp_dir("losson-bad");
        let p = write(&dir, "d.jsonl", &format!("{record}\n{record}\n"));
        let mut o = LoadOptions::new(64);
        o.tokenizer_dir = Some(m.clone());
        o.loss_on = Some(loss);
        o.skip_bad = true;
        let msg = load_examples(&p, &o).unwrap_err().to_string();
        let want = format!(
            "d.jsonl: --loss-on {loss} does not apply to records in format `{format}` (it \
             accepts: {accepted})"
        );
        assert!(msg.contains(&want), "{msg}\n  want: {want}");
    }
    assert_eq!("ALL".parse::<LossOn>(), Ok(LossOn::All));
    assert_eq!(
        LossOn::default_for(Format::PromptCompletion),
        LossOn::Completion
    );
    assert_eq!(LossOn::default_for(Format::ShareGpt), LossOn::Assistant);
    let e = "prompt".parse::<LossOn>().unwrap_err();
    assert!(e.contains("expected assistant, completion or all"), "{e}");
}

#[test]
fn a_model_directory_without_tokenizer_json_is_named() {
    let dir = temp_dir("notokenizer");
    write(&dir, "config.json", "{}");
    let p = write(&dir, "d.jsonl", "{\"text\": \"hello\"}\n");
    let mut o = LoadOptions::new(64);
    o.tokenizer_dir = Some(dir.clone());
    o.skip_bad = true;
    let msg = load_examples(&p, &o).unwrap_err().to_string();
    let want = format!(
        "records are in format `text`, which needs the model's tokenizer, but the model \
         directory {} has no tokenizer.json",
        dir.display()
    );
    assert!(msg.contains(&want), "{msg}");
    // Pretokenized data needs none.
    let p = write(&dir, "t.jsonl", "{\"input_ids\": [1, 2]}\n");
    assert_eq!(load_examples(&p, &o).unwrap().0.len(), 1);
}

#[test]
fn a_chat_template_file_replaces_the_models_and_its_errors_name_the_file() {
    let dir = temp_dir("template-file");
    let file = write(&dir, "chatml.jinja", CHATML);
    let conv = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": " bonjour "}]});
    let alpaca = json!({"instruction": "hello", "output": "bonjour"});
    let load = |model: &std::path::Path,
                template: Option<&std::path::Path>,
                record: &serde_json::Value| {
        let p = write(
            &temp_dir("template-data"),
            "d.jsonl",
            &format!("{record}\n"),
        );
        let mut o = LoadOptions::new(64);
        o.tokenizer_dir = Some(model.to_path_buf());
        o.chat_template = template.map(|t| t.to_path_buf());
        load_examples(&p, &o)
            .map(|(mut e, _)| e.remove(0))
            .map_err(|e| e.to_string())
    };
    // The file wins over the model's template (BOS per add_bos_token: ChatML writes none).
    let chatml = (
        vec![1, 20, 22, 26, 21, 20, 23, 6, 21, 20, 24, 15, 21],
        vec![N, N, N, N, N, N, N, N, N, N, N, 15, 21],
    );
    let m = model_dir("template-override", chat_config(), false);
    let e = load(&m, Some(&file), &conv).unwrap();
    assert_eq!((e.input_ids, e.labels), chatml);
    let own = load(&m, None, &conv).unwrap();
    assert_ne!(own.input_ids, chatml.0, "the model's own template differs");
    // A model with no template gets one: alpaca goes through it instead of prompt/completion.
    let plain = model_dir(
        "template-none",
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
        false,
    );
    let e = load(&plain, Some(&file), &alpaca).unwrap();
    assert_eq!(e.input_ids, chatml.0);
    // Errors name the file (and the line minijinja reports); the template is read with the
    // tokenizer, whatever the records.
    let missing = dir.join("missing.jinja");
    let msg = load(&m, Some(&missing), &conv).unwrap_err();
    let want = format!("{}: cannot read the chat template", missing.display());
    assert!(msg.contains(&want), "{msg}");
    let broken = write(
        &dir,
        "broken.jinja",
        "{% for m in messages %}\n{{ m.content }\n",
    );
    let msg = load(&m, Some(&broken), &json!({"input_ids": [1, 2]})).unwrap_err();
    let want = format!(
        "{}:2: the chat template does not parse: syntax error",
        broken.display()
    );
    assert!(msg.contains(&want), "{msg}");
}
