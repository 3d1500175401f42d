//! Loading: reads a user's data (JSONL, a `.json` array, a Parquet or Arrow table) into
//! [`Example`]s and says exactly what it did in a [`LoadReport`].
//!
//! This module owns record splitting (with 1-based line numbers, and the element
//! index in arrays), the checks every example must pass (non-empty, aligned labels, ids below
//! the vocabulary size), the skipping of examples with no target token (an error under
//! `strict`) and the long-example policy; with a dataset cache it reads and writes the result
//! through `cache.rs`. What a path holds and its text (tables as JSON Lines, one row a line) is
//! `source.rs`' job; turning one record into tokens is `records.rs`' job; tokenizers and chat
//! templates live in `tokenize.rs` and `template.rs`. Nothing is dropped silently: every
//! skipped, truncated, split or dropped example is counted, and skips carry their message.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::cache;
use crate::error::DataError;
use crate::records::{convert_known, convert_record, Converter, Format, LossOn};
use crate::source::{Source, Text};
use crate::stop::StopFlag;
use crate::targets::Built;
use crate::{Example, IGNORE_INDEX};

/// What to do with an example longer than `max_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LongPolicy {
    /// Keep its first `max_len` tokens.
    #[default]
    Truncate,
    /// Cut it into pieces of at most `max_len` tokens; each piece is an example of its own (the
    /// first token of every piece is not a target, as for any example).
    Split,
    /// Leave it out.
    Drop,
}

impl FromStr for LongPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "truncate" => Ok(LongPolicy::Truncate),
            "split" => Ok(LongPolicy::Split),
            "drop" => Ok(LongPolicy::Drop),
            _ => Err(format!(
                "unknown long-example policy `{s}` (expected truncate, split or drop)"
            )),
        }
    }
}

impl fmt::Display for LongPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LongPolicy::Truncate => "truncate",
            LongPolicy::Split => "split",
            LongPolicy::Drop => "drop",
        })
    }
}

/// How to read a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Force a format; `None` detects it from the first record.
    pub format: Option<Format>,
    /// Longest example kept as is.
    pub max_len: usize,
    /// What to do with longer ones.
    pub long: LongPolicy,
    /// Count and report bad records instead of failing on the first.
    pub skip_bad: bool,
    /// Token ids must be below this (the model's vocabulary); `None` skips the check unless a
    /// tokenizer is loaded, whose vocabulary size is then used.
    pub vocab_size: Option<usize>,
    /// The model directory holding `tokenizer.json` and `tokenizer_config.json`.
    pub tokenizer_dir: Option<PathBuf>,
    /// A Jinja file used instead of the model's chat template (HF's `tokenizer.chat_template =
    /// ...`); `None` keeps the model's own.
    pub chat_template: Option<PathBuf>,
    /// A directory for the tokenised-data cache, keyed by all of the above and the files they
    /// name (see `cache.rs`); `None` tokenises every time.
    pub dataset_cache: Option<PathBuf>,
    /// Fail on an example with no target token instead of counting it in `no_targets`.
    pub strict: bool,
    /// Checked between records: once raised, loading stops with [`DataError::signal`] set.
    pub stop: StopFlag,
    /// Which tokens are targets; `None` keeps the format's default ([`LossOn::default_for`]).
    /// A value the file's format does not accept fails loading (see [`LossOn::check`]).
    pub loss_on: Option<LossOn>,
    /// Columns renamed before conversion, `(new, old)` (`--columns new=old,...`; Parquet and
    /// Arrow tables).
    pub columns: Vec<(String, String)>,
}

impl LoadOptions {
    /// Detect the format, truncate long examples, fail on bad records, no tokenizer.
    pub fn new(max_len: usize) -> Self {
        LoadOptions {
            format: None,
            max_len,
            long: LongPolicy::Truncate,
            skip_bad: false,
            vocab_size: None,
            tokenizer_dir: None,
            strict: false,
            stop: StopFlag::new(),
            loss_on: None,
            chat_template: None,
            dataset_cache: None,
            columns: Vec::new(),
        }
    }
}

/// What loading did, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Records read (non-blank lines, or array elements).
    pub records: usize,
    /// Examples produced (a split record gives several).
    pub examples: usize,
    /// The dataset cache file the examples were read from instead of tokenising the data
    /// (`None`: tokenised now).
    pub cached: Option<PathBuf>,
    /// Bad records skipped under `skip_bad` (undecodable lines included).
    pub skipped: usize,
    /// Examples skipped because they hold no target token (unless `strict`). Their loss would
    /// be nothing, so skipping them changes no loss.
    pub no_targets: usize,
    /// Records cut to `max_len`.
    pub truncated: usize,
    /// Records cut into several examples.
    pub split: usize,
    /// Records (or split pieces) left out: longer than `max_len` under `drop`, or with no target
    /// token left after truncation or splitting.
    pub dropped: usize,
    /// One line per skip or drop (the first few; the counts above are always complete), after
    /// a line about the dataset cache if it was ignored or could not be written.
    pub warnings: Vec<String>,
}

/// Warnings kept in a report; the counts stay exact beyond it.
const MAX_WARNINGS: usize = 20;

impl LoadReport {
    fn warn(&mut self, w: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records -> {} examples ({} skipped, {} truncated, {} split, {} dropped)",
            self.records, self.examples, self.skipped, self.truncated, self.split, self.dropped
        )?;
        if self.no_targets > 0 {
            write!(
                f,
                "; {} examples with no target tokens skipped",
                self.no_targets
            )?;
        }
        if let Some(file) = &self.cached {
            write!(f, "; read from the dataset cache {}", file.display())?;
        }
        Ok(())
    }
}

/// Reads `path` (JSONL, a `.json` file holding an array of records, a Parquet or Arrow file, or
/// a directory `save_to_disk` wrote) into examples.
pub fn load_examples(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Example>, LoadReport), DataError> {
    if opts.max_len == 0 {
        return Err(DataError::msg("max_len must be at least 1"));
    }
    let source = Source::read(path)?;
    let Some(dir) = &opts.dataset_cache else {
        return load_source(path, source, opts);
    };
    let Some(key) = cache::key(path, &source.bytes(), opts) else {
        return load_source(path, source, opts);
    };
    let file = cache::file_of(dir, &key);
    let ignored = match cache::read(&file, &key) {
        Ok(Some((examples, mut report))) => {
            report.cached = Some(file);
            return Ok((examples, report));
        }
        Ok(None) => None,
        Err(why) => Some(format!(
            "ignored the dataset cache file {}: {why}",
            file.display()
        )),
    };
    let (examples, mut report) = load_source(path, source, opts)?;
    let unwritten = cache::write(&file, &key, &examples, &report)
        .err()
        .map(|e| {
            format!(
                "cannot write the dataset cache file {}: {e}",
                file.display()
            )
        });
    // Said first: the warnings that follow are capped, these two are not.
    report
        .warnings
        .splice(0..0, ignored.into_iter().chain(unwritten));
    Ok((examples, report))
}

/// [`load_examples`] of a source whose bytes are read.
fn load_source(
    path: &Path,
    source: Source,
    opts: &LoadOptions,
) -> Result<(Vec<Example>, LoadReport), DataError> {
    let (text, undecodable) = source.into_text(path, &opts.columns)?;
    let stopped = || opts.stop.raised().map(|sig| DataError::stopped(path, sig));
    if let Some(e) = stopped() {
        return Err(e);
    }
    let (records, is_array) = split_records(path, &text)?;
    let mut conv = Converter::new(path, opts, false)?;
    let vocab = conv.vocab_size();
    let check = |line, r: Result<Built, DataError>| {
        r.and_then(|b| check_example(path, line, &b.example, vocab).map(|_| b.example))
    };
    // Records up to the first whose format is recognised go one by one (it fixes the format);
    // the rest are converted in parallel, and results are consumed in file order.
    let mut results = Vec::with_capacity(records.len());
    let mut first = 0;
    while first < records.len() && conv.format().is_none() {
        if let Some(e) = stopped() {
            return Err(e);
        }
        let (line, raw) = records[first];
        results.push(check(line, convert_record(&mut conv, line, raw)));
        first += 1;
    }
    if let Some(fatal) = conv.fatal() {
        return Err(fatal);
    }
    let rest = &records[first..];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rest.len().div_ceil(threads).max(256);
    std::thread::scope(|scope| {
        let conv = &conv;
        let handles: Vec<_> = rest
            .chunks(chunk)
            .map(|part| {
                let stop = &opts.stop;
                scope.spawn(move || {
                    // Checked per record: a record's template render is bounded by its fuel.
                    part.iter()
                        .take_while(|_| stop.raised().is_none())
                        .map(|&(line, raw)| check(line, convert_known(conv, line, raw)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            results.extend(h.join().expect("a conversion thread panicked"));
        }
    });
    if let Some(e) = stopped() {
        return Err(e);
    }
    let mut report = LoadReport::default();
    let mut examples = Vec::with_capacity(records.len());
    // Undecodable lines are records that failed: merged back in file order.
    let mut undecodable = undecodable.into_iter().peekable();
    let mut results: Vec<(usize, Result<Example, DataError>)> = records
        .iter()
        .zip(results)
        .enumerate()
        .map(|(i, (&(line, _), r))| {
            let r = match r {
                Ok(e) if opts.strict && e.target_tokens() == 0 => Err(no_target_error(path, line)),
                r => r,
            };
            let r = r.map_err(|mut e| {
                e.element = is_array.then_some(i);
                e
            });
            (line, r)
        })
        .collect();
    if undecodable.peek().is_some() {
        results.extend(undecodable.map(|(line, e)| (line, Err(e))));
        results.sort_by_key(|r| r.0);
    }
    for (line, result) in results {
        report.records += 1;
        match result {
            Ok(e) if e.target_tokens() == 0 => {
                report.no_targets += 1;
                report.warn(format!(
                    "line {line}: skipped: no target tokens (every label after the first is -100)"
                ));
            }
            Ok(e) => apply_long_policy(e, line, opts, &mut report, &mut examples),
            Err(err) if opts.skip_bad => {
                report.skipped += 1;
                report.warn(format!("skipped {err}"));
            }
            Err(err) => return Err(err),
        }
    }
    if report.records == 0 {
        return Err(DataError::file(path, "no records: the file is empty"));
    }
    if examples.is_empty() {
        return Err(DataError::file(
            path,
            format!("no usable examples ({report})"),
        ));
    }
    report.examples = examples.len();
    Ok((examples, report))
}

/// The text of `path` (see [`Source::into_text`]): a file's text and its lines that are not
/// UTF-8 as errors (a JSON array with such a line is an error of its own: an array cannot lose a
/// line and stay an array), or a table's rows as JSON Lines (columns renamed by `columns`).
pub(crate) fn read_text(path: &Path, columns: &[(String, String)]) -> Result<Text, DataError> {
    Source::read(path)?.into_text(path, columns)
}

/// `(1-based line, record text)` of each record of a file.
pub(crate) type Records<'a> = Vec<(usize, &'a str)>;

/// Splits a file into `(1-based line, record text)`, and says whether it is a JSON array: one
/// record per element for a file starting with `[`, else one per non-blank line (JSON Lines).
/// A `.json` file holding JSON Lines is read as such; any other `.json` file that is not an
/// array is refused with a hint.
pub(crate) fn split_records<'a>(
    path: &Path,
    text: &'a str,
) -> Result<(Records<'a>, bool), DataError> {
    let start = text.trim_start();
    let is_array = start.starts_with('[');
    if !is_array {
        if path.extension().is_some_and(|e| e == "json") && !start.is_empty() {
            // JSON Lines under a .json name: the first line is a whole JSON object.
            let first = start.lines().next().unwrap_or_default();
            let one_object = serde_json::from_str::<serde_json::Map<String, Value>>(first).is_ok();
            if !one_object {
                return Err(DataError::file(
                    path,
                    "a .json file must hold a JSON array of records `[{...}, {...}]`, or one \
                     JSON object per line (JSON Lines, usually named .jsonl): rename it to \
                     .jsonl if it holds one record per line",
                ));
            }
        }
        let lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect();
        return Ok((lines, false));
    }
    let raws: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)
        .map_err(|e| DataError::at(path, e.line(), None, format!("malformed JSON array: {e}")))?;
    let base = text.as_ptr() as usize;
    let (mut line, mut scanned) = (1, 0);
    let mut out = Vec::with_capacity(raws.len());
    for r in raws {
        let at = r.get().as_ptr() as usize - base;
        line += text.as_bytes()[scanned..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        scanned = at;
        out.push((line, r.get()));
    }
    Ok((out, true))
}

/// The checks every example passes whatever its format.
pub(crate) fn check_example(
    path: &Path,
    line: usize,
    e: &Example,
    vocab_size: Option<usize>,
) -> Result<(), DataError> {
    if e.is_empty() {
        return Err(DataError::at(path, line, None, "empty example: no tokens"));
    }
    if e.labels.len() != e.len() {
        return Err(DataError::at(
            path,
            line,
            Some("labels"),
            format!(
                "has {} entries but `input_ids` has {}; labels must be aligned with input_ids",
                e.labels.len(),
                e.len()
            ),
        ));
    }
    let vocab = vocab_size.map_or(i64::MAX, |v| v as i64);
    for (field, values) in [("input_ids", &e.input_ids), ("labels", &e.labels)] {
        let bad = values.iter().enumerate().find(|&(_, &t)| {
            let ignored = field == "labels" && t == IGNORE_INDEX;
            !ignored && (t < 0 || t as i64 >= vocab)
        });
        if let Some((i, &t)) = bad {
            let why = if t < 0 {
                "is negative".to_string()
            } else {
                format!(
                    "is not below the vocabulary size {}",
                    vocab_size.unwrap_or(0)
                )
            };
            return Err(DataError::at(
                path,
                line,
                Some(field),
                format!("token id {t} at index {i} {why}"),
            ));
        }
    }
    Ok(())
}

/// The error `strict` loading gives an example with no target token.
fn no_target_error(path: &Path, line: usize) -> DataError {
    DataError::at(
        path,
        line,
        Some("labels"),
        "nothing to train: every label after the first is -100 (strict loading refuses such \
         examples; without it they are skipped and counted)",
    )
}

fn apply_long_policy(
    e: Example,
    line: usize,
    opts: &LoadOptions,
    report: &mut LoadReport,
    out: &mut Vec<Example>,
) {
    let m = opts.max_len;
    if e.len() <= m {
        out.push(e);
        return;
    }
    let mut keep = |piece: Example, what: &str, report: &mut LoadReport| {
        if piece.target_tokens() > 0 {
            out.push(piece);
        } else {
            report.dropped += 1;
            report.warn(format!(
                "line {line}: dropped: no target token left after {what}"
            ));
        }
    };
    match opts.long {
        LongPolicy::Truncate => {
            report.truncated += 1;
            let piece = Example {
                input_ids: e.input_ids[..m].to_vec(),
                labels: e.labels[..m].to_vec(),
            };
            keep(piece, "truncation", report);
        }
        LongPolicy::Split => {
            report.split += 1;
            for (ids, labels) in e.input_ids.chunks(m).zip(e.labels.chunks(m)) {
                let piece = Example {
                    input_ids: ids.to_vec(),
                    labels: labels.to_vec(),
                };
                keep(piece, "splitting", report);
            }
        }
        LongPolicy::Drop => {
            report.dropped += 1;
            report.warn(format!(
                "line {line}: dropped: {} tokens, longer than max_len {m}",
                e.len()
            ));
        }
    }
}
