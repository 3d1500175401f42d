//! The tokenised-data cache: a hit gives the same examples and report without tokenising; any
//! change of data, tokenizer files, template or option misses; a stale or corrupt file is
//! ignored with a warning and replaced.

use std::path::{Path, PathBuf};

use nopad_data::{load_examples, Example, Format, LoadOptions, LoadReport, LongPolicy, LossOn};
use serde_json::json;

use crate::formats::{chat_config, model_dir, CHATML};
use crate::util::{temp_dir, write};

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "bonjour"}]}"#;

/// A model, a data file and a cache directory of their own.
struct Setup {
    model: PathBuf,
    data: PathBuf,
    cache: PathBuf,
    dir: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = temp_dir(name);
    let model = model_dir(&format!("{name}-model"), chat_config(), true);
    let long = r#"{"messages": [{"role": "user", "content": "hello world what is two plus two"}, {"role": "assistant", "content": "four four four four"}]}"#;
    let data = write(&dir, "d.jsonl", &format!("{CHAT}\nnot json\n{long}\n"));
    let cache = dir.join("cache");
    Setup {
        model,
        data,
        cache,
        dir,
    }
}

impl Setup {
    fn opts(&self) -> LoadOptions {
        let mut o = LoadOptions::new(64);
        o.tokenizer_dir = Some(self.model.clone());
        o.skip_bad = true;
        o.dataset_cache = Some(self.cache.clone());
        o
    }
    fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.cache)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn load(o: &LoadOptions, data: &Path) -> (Vec<Example>, LoadReport) {
    load_examples(data, o).unwrap()
}

#[test]
fn a_hit_gives_what_tokenising_gave() {
    let s = setup("cache-hit");
    let mut plain = s.opts();
    plain.dataset_cache = None;
    let fresh = load(&plain, &s.data);
    let first = load(&s.opts(), &s.data);
    assert_eq!(
        first, fresh,
        "a miss tokenises, and says nothing of the cache"
    );
    assert_eq!(s.files().len(), 1);
    let (examples, report) = load(&s.opts(), &s.data);
    assert_eq!(examples, fresh.0);
    assert_eq!(report.cached.as_deref(), Some(s.files()[0].as_path()));
    assert_eq!(
        LoadReport {
            cached: None,
            ..report.clone()
        },
        fresh.1
    );
    assert!(
        report.to_string().contains("read from the dataset cache"),
        "{report}"
    );
    assert!(
        fresh.1.skipped == 1 && !report.warnings.is_empty(),
        "{report:?}"
    );
}

#[test]
fn any_change_of_what_loading_reads_or_is_told_misses() {
    let s = setup("cache-miss");
    let base = s.opts();
    load(&base, &s.data);
    let template = write(&s.dir, "chatml.jinja", CHATML);
    let mut variants: Vec<(&str, LoadOptions)> = vec![];
    let mut with = |what: &'static str, f: &dyn Fn(&mut LoadOptions)| {
        let mut o = base.clone();
        f(&mut o);
        variants.push((what, o));
    };
    with("format", &|o| o.format = Some(Format::Messages));
    with("max_len", &|o| o.max_len = 8);
    with("long", &|o| o.long = LongPolicy::Split);
    with("vocab_size", &|o| o.vocab_size = Some(100));
    with("strict", &|o| o.strict = true);
    with("loss_on", &|o| o.loss_on = Some(LossOn::All));
    with("chat_template", &|o| {
        o.chat_template = Some(template.clone())
    });
    for (what, o) in &variants {
        let (_, r) = load(o, &s.data);
        assert_eq!(r.cached, None, "{what} changed, yet the cache answered");
    }
    let mut noskip = base.clone();
    noskip.skip_bad = false;
    assert!(
        load_examples(&s.data, &noskip).is_err(),
        "skip_bad is in the key"
    );
    // The same options hit each their own entry now.
    for (what, o) in &variants {
        assert!(load(o, &s.data).1.cached.is_some(), "{what}");
    }
    // Files: the data's bytes, each tokenizer file, and a template file's bytes.
    let misses = |s: &Setup, o: &LoadOptions, what: &str| {
        let (_, r) = load(o, &s.data);
        assert_eq!(r.cached, None, "{what} changed, yet the cache answered");
    };
    std::fs::write(&s.data, format!("{CHAT}\nnot json\n")).unwrap();
    misses(&s, &base, "the data");
    let cfg = s.model.join("tokenizer_config.json");
    let mut c = chat_config();
    c["add_bos_token"] = json!(false);
    std::fs::write(&cfg, c.to_string()).unwrap();
    misses(&s, &base, "tokenizer_config.json");
    let tok = s.model.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(&tok, text.replace("\"hello\"", "\"hallo\"")).unwrap();
    misses(&s, &base, "tokenizer.json");
    write(&s.model, "chat_template.jinja", CHATML);
    misses(&s, &base, "chat_template.jinja beside the model");
    let with_file = &variants.last().unwrap().1;
    std::fs::write(&template, CHATML.replace("system", "user")).unwrap();
    misses(&s, with_file, "the --chat-template file");
}

#[test]
fn a_stale_or_corrupt_file_is_ignored_with_a_warning_and_replaced() {
    let s = setup("cache-bad");
    let (fresh, _) = load(&s.opts(), &s.data);
    let file = s.files().remove(0);
    let good = std::fs::read(&file).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut other = s.opts();
    other.max_len = 9;
    load(&other, &s.data);
    let stale = s.files().into_iter().find(|f| *f != file).unwrap();
    for (bytes, why) in [
        (flipped, "corrupt: its checksum does not match"),
        (good[..good.len() - 3].to_vec(), "truncated or extended"),
        (
            b"{\"not\": \"ours\"}".to_vec(),
            "not a nopad dataset cache file",
        ),
        (
            std::fs::read(&stale).unwrap(),
            "stale: it was written for other",
        ),
    ] {
        std::fs::write(&file, bytes).unwrap();
        let (examples, report) = load(&s.opts(), &s.data);
        assert_eq!(examples, fresh, "{why}");
        assert_eq!(report.cached, None, "{why}");
        let want = format!("ignored the dataset cache file {}: {why}", file.display());
        assert!(
            report.warnings[0].starts_with(&want),
            "{:?}",
            report.warnings
        );
        // Replaced: the next load hits.
        assert!(load(&s.opts(), &s.data).1.cached.is_some(), "{why}");
    }
}

#[test]
fn a_cache_that_cannot_be_written_is_said_and_loading_goes_on() {
    let s = setup("cache-unwritable");
    let mut o = s.opts();
    // A file where the directory should be.
    o.dataset_cache = Some(s.data.clone());
    let (examples, report) = load(&o, &s.data);
    assert_eq!(examples.len(), 2);
    let want = "cannot write the dataset cache file";
    assert!(
        report.warnings[0].starts_with(want),
        "{:?}",
        report.warnings
    );
}
