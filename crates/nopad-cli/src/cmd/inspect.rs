//! `nopad inspect`: a data file as training will see it, before any training. For the first
//! records, the text the tokenizer saw with the trained text marked (`[[...]]`, or colour on a
//! terminal) and every token with its id and label; then the report loading the whole file
//! gives (records read, skipped and why, truncated, examples with no target).
//!
//! Glue only: the records come from nopad-data's `inspect_records` and the report from
//! `load_examples`, under the same options training builds from the same flags.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use nopad_data::{inspect_records, load_examples, Example, Inspected, Inspection, LongPolicy};

use super::train::FINE_TUNE_MAX_LEN;

/// Arguments of `nopad inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Model directory: tokenizer.json and tokenizer_config.json (needed for text formats), and
    /// config.json, whose vocabulary size and length limit training uses.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The data file (JSONL or a .json array, in any format `nopad train` reads).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// How many records to show.
    #[arg(short = 'n', long = "records", value_name = "N", default_value_t = 3)]
    pub records: usize,
    /// Longest example in tokens. Default as `nopad train`'s: the model's
    /// max_position_embeddings up to 4096 (4096 without config.json).
    #[arg(long, value_name = "N", visible_aliases = ["max-seq-length", "max-length"])]
    pub max_len: Option<usize>,
    #[command(flatten)]
    pub loader: super::LoaderArgs,
    /// Targets: assistant, completion or all (default: the format's own), as `nopad train`.
    #[arg(long, value_name = "WHICH")]
    pub loss_on: Option<nopad_data::LossOn>,
}

/// How trained text is marked: colour on a terminal, brackets elsewhere (files, pipes, logs).
fn marks() -> (&'static str, &'static str) {
    if std::io::stdout().is_terminal() {
        ("\x1b[1;32m", "\x1b[0m")
    } else {
        ("[[", "]]")
    }
}

/// Runs `nopad inspect`.
pub fn run(a: &InspectArgs) -> Result<()> {
    anyhow::ensure!(a.records >= 1, "--records must be at least 1");
    // The vocabulary and length training checks against come from config.json when there is one.
    let model = a.model.as_deref().map(super::model_path).transpose()?;
    let cfg = match &model {
        Some(dir) if dir.join("config.json").is_file() => {
            Some(nopad_model::weights::read_config(dir)?)
        }
        _ => None,
    };
    let max_len = a.max_len.unwrap_or_else(|| {
        cfg.as_ref().map_or(FINE_TUNE_MAX_LEN, |c| {
            c.max_position_embeddings.clamp(8, FINE_TUNE_MAX_LEN)
        })
    });
    anyhow::ensure!(max_len >= 1, "--max-len must be at least 1");
    let mut opts = a.loader.options(max_len);
    opts.loss_on = a.loss_on;
    opts.vocab_size = cfg.as_ref().map(|c| c.vocab_size);
    opts.tokenizer_dir = model;
    let what = || format!("cannot inspect {}", a.data.display());
    let view = inspect_records(&a.data, &opts, a.records).with_context(what)?;
    let format = view.format.map_or("unknown".into(), |f| f.to_string());
    println!("{}: format {format}, max-len {max_len}", a.data.display());
    for (k, rec) in view.records.iter().enumerate() {
        println!();
        print_record(&view, k + 1, rec, max_len, opts.long);
    }
    println!();
    // The whole file, as training loads it: the same report, or the error that would stop it.
    let (_, report) = load_examples(&a.data, &opts)
        .with_context(|| format!("training would stop: {} cannot be loaded", a.data.display()))?;
    println!("training would load: {report}");
    for w in &report.warnings {
        println!("  {w}");
    }
    Ok(())
}

/// One record: a header, the marked text, the tokens.
fn print_record(view: &Inspection, k: usize, rec: &Inspected, max_len: usize, long: LongPolicy) {
    let e = match &rec.example {
        Ok(e) => e,
        Err(err) => {
            println!("record {k} (line {}): {err}", rec.line);
            return;
        }
    };
    let note = match (e.len() > max_len, e.target_tokens()) {
        (_, 0) => " (no target token: training skips it)".to_string(),
        (true, _) => format!(
            " (longer than --max-len {max_len}: {})",
            long_note(e, max_len, long)
        ),
        _ => String::new(),
    };
    println!(
        "record {k} (line {}): {} tokens, {} targets{note}",
        rec.line,
        e.len(),
        e.target_tokens()
    );
    if let Some(text) = view.marked(rec, marks()) {
        for line in text.lines() {
            println!("  | {line}");
        }
    }
    println!("  {:>6} {:>8} {:>8}  token", "pos", "id", "label");
    for (i, (&id, &label)) in e.input_ids.iter().zip(&e.labels).enumerate() {
        if i == max_len {
            println!("  ------ --max-len {max_len} ------");
        }
        let token = view.token(id).map_or(String::new(), |t| format!("{t:?}"));
        println!("  {i:>6} {id:>8} {label:>8}  {token}");
    }
}

/// What the long-example policy does with `e`.
fn long_note(e: &Example, max_len: usize, long: LongPolicy) -> String {
    match long {
        LongPolicy::Truncate => format!("truncated to its first {max_len} tokens"),
        LongPolicy::Split => format!("split into {} examples", e.len().div_ceil(max_len)),
        LongPolicy::Drop => "dropped".to_string(),
    }
}
