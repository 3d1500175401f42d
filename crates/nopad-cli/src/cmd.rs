//! One module per subcommand: its flags (clap `Args`) and its `run`, which builds the library's
//! configuration and hands it to `crate::device::run_on`.

pub mod bench;
pub mod dist;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod stats;
pub mod train;

use std::path::PathBuf;

use nopad_data::{Format, LoadOptions, LongPolicy};

/// The loader's flags, the same on `nopad eval`, `nopad stats` and `nopad inspect` (`nopad train`
/// takes them as optional overrides of its config file, so it keeps its own).
#[derive(clap::Args, Debug)]
pub struct LoaderArgs {
    /// Record format [pretokenized, text, prompt-completion, messages, sharegpt, alpaca]; detected from
    /// the first record when absent (as `nopad train` does).
    #[arg(long)]
    pub format: Option<Format>,
    /// What to do with examples longer than --max-len [truncate, split, drop].
    #[arg(long, value_name = "POLICY", default_value = "truncate")]
    pub long: LongPolicy,
    /// Count and report bad records instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Stop at an example with no target token instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
    /// A Jinja chat template file used instead of the model's own (as HF's
    /// `tokenizer.chat_template = ...`).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Keep the tokenised examples in this directory, keyed by the data, the tokenizer files,
    /// the template and these options, and read them from there when nothing changed (off by
    /// default: the files are as large as the tokenised data).
    #[arg(long, value_name = "DIR")]
    pub dataset_cache: Option<PathBuf>,
    /// Rename a Parquet or Arrow table's columns to the fields a format reads, e.g.
    /// prompt=question,completion=answer.
    #[arg(long, value_name = "NEW=OLD,...", value_parser = parse_columns)]
    pub columns: Option<Columns>,
}

/// `--columns`: `(new, old)` pairs (one flag value, so clap must not take it for a list).
#[derive(Clone, Debug)]
pub struct Columns(pub Vec<(String, String)>);

fn parse_columns(s: &str) -> Result<Columns, String> {
    nopad_data::parse_columns(s).map(Columns)
}

impl LoaderArgs {
    /// The loader's options for examples up to `max_len` tokens, with these flags set.
    pub fn options(&self, max_len: usize) -> LoadOptions {
        let mut opts = LoadOptions::new(max_len);
        opts.format = self.format;
        opts.long = self.long;
        opts.skip_bad = self.skip_bad;
        opts.strict = self.strict;
        opts.chat_template = self.chat_template.clone();
        opts.dataset_cache = self.dataset_cache.clone();
        opts.columns = self.columns.clone().map(|c| c.0).unwrap_or_default();
        opts
    }
}

/// What `--model` names: a model directory, a preset (tiny, small, llama-3.1-8b, ...; random
/// init), or a Hub id (`org/name`) found in the local Hugging Face cache (never downloaded).
/// A name that is none of these is a preset name the training refuses with the list of presets.
pub fn model_source(m: &str) -> anyhow::Result<nopad_train::ModelSource> {
    use nopad_train::ModelSource;
    let path = std::path::Path::new(m);
    if path.is_dir() {
        return Ok(ModelSource::Dir(path.into()));
    }
    if nopad_model::Config::preset(m).is_none() && nopad_model::hub::looks_like_hub_id(m) {
        let cache = nopad_model::hub::cache_dir(|k| std::env::var(k).ok()).ok_or_else(|| {
            anyhow::anyhow!("--model {m}: not a directory, and no Hugging Face cache is known (HOME, HF_HOME and HF_HUB_CACHE are unset)")
        })?;
        let dir = nopad_model::hub::resolve_in(&cache, m, None)?;
        eprintln!("nopad: --model {m}: {}", dir.display());
        return Ok(ModelSource::Dir(dir));
    }
    Ok(ModelSource::Preset(m.to_string()))
}

/// The directory a `--model` path names for commands that read only its tokenizer and config
/// (`stats`, `inspect`): the path itself, or a Hub id's snapshot in the local cache
/// ([`model_source`]); a preset name stays as given.
pub fn model_path(m: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    match m.to_str().map(model_source).transpose()? {
        Some(nopad_train::ModelSource::Dir(d)) => Ok(d),
        _ => Ok(m.to_path_buf()),
    }
}
