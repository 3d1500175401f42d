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

mod edge_cases {
    use nopad_data::{load_examples, LoadOptions};

    use crate::util::temp_dir;

    fn opts() -> LoadOptions {
        let mut o = LoadOptions::new(16);
        o.vocab_size = Some(100);
        o
    }

    /// Writes `bytes` to a fresh file `name`.
    fn file(name: &str, bytes: impl AsRef<[u8]>) -> std::path::PathBuf {
        let p = temp_dir("edge").join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn error(path: &std::path::Path, opts: &LoadOptions) -> String {
        load_examples(path, opts).unwrap_err().to_string()
    }

    #[test]
    fn examples_with_no_target_are_skipped_and_counted_unless_strict() {
        let text = "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [7]}\n\
             {\"input_ids\": [1, 2], \"labels\": [1, -100]}\n{\"input_ids\": [4, 5]}\n";
        let p = file("d.jsonl", text);
        let (ex, r) = load_examples(&p, &opts()).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(
            (r.records, r.examples, r.no_targets, r.skipped),
            (4, 2, 2, 0)
        );
        assert!(
            r.to_string()
                .ends_with("; 2 examples with no target tokens skipped"),
            "{r}"
        );
        assert!(r.warnings[0].contains("line 2"), "{:?}", r.warnings);
        let mut strict = opts();
        strict.strict = true;
        let err = error(&p, &strict);
        assert!(
            err.contains("d.jsonl:2: field `labels`: nothing to train"),
            "{err}"
        );
        // A file of nothing but such examples has no usable example.
        let p = file("none.jsonl", "{\"input_ids\": [7]}\n");
        let err = error(&p, &opts());
        assert!(err.contains("no usable examples"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_stripped() {
        let text = "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3, 4]}\n";
        for name in ["bom.jsonl", "bom.json"] {
            let body = if name.ends_with(".json") {
                "[{\"input_ids\": [1, 2]}, {\"input_ids\": [3, 4]}]"
            } else {
                text
            };
            let p = file(name, [b"\xEF\xBB\xBF", body.as_bytes()].concat());
            let mut o = opts();
            o.skip_bad = true;
            let (ex, r) = load_examples(&p, &o).unwrap();
            assert_eq!(
                (ex.len(), r.skipped),
                (2, 0),
                "{name}: the first record kept"
            );
            assert_eq!(ex[0].input_ids, [1, 2]);
        }
    }

    #[test]
    fn invalid_utf8_names_the_line_and_skip_bad_skips_only_it() {
        let bytes = b"{\"input_ids\": [1, 2]}\n{\"text\": \"caf\xE9\"}\n{\"input_ids\": [3, 4]}\n";
        let p = file("latin1.jsonl", bytes);
        let err = error(&p, &opts());
        assert!(err.contains("latin1.jsonl:2: not valid UTF-8"), "{err}");
        let mut o = opts();
        o.skip_bad = true;
        let (ex, r) = load_examples(&p, &o).unwrap();
        assert_eq!((ex.len(), r.records, r.skipped), (2, 3, 1));
        assert_eq!(ex[1].input_ids, [3, 4]);
        // In an array nothing can be skipped: the line is named.
        let p = file(
            "latin1.json",
            b"[{\"input_ids\": [1]},\n {\"text\": \"\xE9\"}]",
        );
        let err = error(&p, &o);
        assert!(err.contains("latin1.json:2: not valid UTF-8"), "{err}");
    }

    #[test]
    fn a_one_line_array_names_the_bad_element() {
        let text = "[{\"input_ids\": [1, 2]}, {\"input_ids\": [3, 4]}, {\"input_ids\": [5, 500]}]";
        let p = file("a.json", text);
        let err = error(&p, &opts());
        assert!(
            err.contains("a.json:1: array element 2: field `input_ids`: token id 500"),
            "{err}"
        );
    }

    #[test]
    fn json_lines_in_a_json_file_are_read_as_such() {
        let p = file(
            "d.json",
            "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3, 4]}\n",
        );
        let (ex, r) = load_examples(&p, &opts()).unwrap();
        assert_eq!((ex.len(), r.records), (2, 2));
        // A .json file that is neither an array nor JSON Lines gets a hint.
        let p = file("obj.json", "{\n  \"data\": [1, 2]\n}\n");
        let err = error(&p, &opts());
        assert!(
            err.contains("obj.json: a .json file must hold a JSON array") && err.contains(".jsonl"),
            "{err}"
        );
    }
}

/// A raised stop flag (a first Ctrl-C) ends loading between records with the signal named, not
/// after the whole file.
#[test]
fn a_raised_stop_flag_ends_loading_with_the_signal() {
    let dir = crate::util::temp_dir("stop");
    let line = "{\"input_ids\": [1, 5, 9, 13, 2]}\n";
    let path = crate::util::write(&dir, "big.jsonl", &line.repeat(5000));
    let mut opts = nopad_data::LoadOptions::new(64);
    let (ok, _) = nopad_data::load_examples(&path, &opts).unwrap();
    assert_eq!(ok.len(), 5000);
    opts.stop = nopad_data::StopFlag::new();
    opts.stop.raise(2);
    let e = nopad_data::load_examples(&path, &opts).unwrap_err();
    assert_eq!(e.signal, Some(2));
    assert!(e.to_string().contains("stopped by signal 2"), "{e}");
    // Clones share the flag: the options' copy sees a raise made through another clone.
    let flag = nopad_data::StopFlag::new();
    opts.stop = flag.clone();
    flag.raise(15);
    assert_eq!(
        nopad_data::load_examples(&path, &opts).unwrap_err().signal,
        Some(15)
    );
}
