//! Files as an unlucky or hostile user hands them over: chat templates that do not stop or grow
//! without bound, tokenizer configs of the wrong shape, and data edge cases. Every failure names
//! the file and line (and the template or field); nothing panics or aborts.

use serde_json::json;

use crate::formats::{load_one, model_dir, TEMPLATE};
use nopad_data::ModelTokenizer;

/// A model directory whose chat template is `template`.
fn with_template(name: &str, template: &str) -> std::path::PathBuf {
    model_dir(
        name,
        json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}),
        false,
    )
}

fn chat_record() -> serde_json::Value {
    json!({"messages": [{"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "world"}]})
}

#[test]
fn a_template_that_loops_without_end_runs_out_of_fuel() {
    let m = with_template(
        "fuel",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    );
    let err = load_one(&m, None, chat_record()).unwrap_err();
    assert!(
        err.contains("d.jsonl:1")
            && err.contains("the template is ")
            && err.contains("tokenizer_config.json field `chat_template`")
            && err.contains("ran out of fuel"),
        "{err}"
    );
}

#[test]
fn a_template_that_doubles_its_output_hits_the_output_budget() {
    // Each level renders the one below twice: 2^40 bytes if nothing stopped it.
    let m = with_template(
        "doubling",
        "{% macro d(n) %}{% if n == 0 %}xxxxxxxx{% else %}{{ d(n - 1) }}{{ d(n - 1) }}\
         {% endif %}{% endmacro %}{{ d(37) }}",
    );
    let err = load_one(&m, None, chat_record()).unwrap_err();
    assert!(
        err.contains("d.jsonl:1")
            && err.contains("chat_template")
            && err.contains("exceeds the budget"),
        "{err}"
    );
}

#[test]
fn include_and_import_find_no_template() {
    for t in [
        "{% include 'tokenizer_config.json' %}",
        "{% import 'chat_template.jinja' as m %}",
        "{% extends 'base.jinja' %}",
    ] {
        let m = with_template("include", t);
        std::fs::write(m.join("chat_template.jinja"), "secret").unwrap();
        std::fs::write(m.join("base.jinja"), "secret").unwrap();
        let err = load_one(&m, None, chat_record()).unwrap_err();
        assert!(
            err.contains("d.jsonl:1") && err.contains("not found") && !err.contains("secret"),
            "{t}: {err}"
        );
    }
}

#[test]
fn a_chat_template_of_the_wrong_type_is_named() {
    for (value, found) in [
        (json!(42), "found an integer"),
        (json!({"default": TEMPLATE}), "found an object"),
        (json!([]), "an empty list of templates"),
        (
            json!([{"name": "default", "template": 7}]),
            "has no `template` string",
        ),
    ] {
        let m = model_dir(
            "badtmpl",
            json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": value}),
            false,
        );
        let err = ModelTokenizer::load(&m).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json")
                && err.contains("field `chat_template`")
                && err.contains(found),
            "{value}: {err}"
        );
    }
    // Null is the same as absent: no template, and the file loads.
    let m = model_dir(
        "nulltmpl",
        json!({"eos_token": "</s>", "chat_template": null}),
        false,
    );
    assert!(!ModelTokenizer::load(&m).unwrap().has_chat_template());
}
