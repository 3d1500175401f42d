//! Loading: reads a user's JSONL (or `.json` array) file into [`Example`]s and says exactly what
//! it did in a [`LoadReport`].
//!
//! This module owns file reading, record splitting (with 1-based line numbers),
//! the checks every example must pass (non-empty, aligned labels, ids below the vocabulary size)
//! and the long-example policy. Turning one record into tokens is `records.rs`' job; tokenizers
//! and chat templates live in `tokenize.rs`. Nothing is dropped silently: every skipped,
//! truncated, split or dropped example is counted, and skips carry their error message.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::DataError;
use crate::records::{convert_known, convert_record, Converter, Format};
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
    /// Bad records skipped under `skip_bad`.
    pub skipped: usize,
    /// Records cut to `max_len`.
    pub truncated: usize,
    /// Records cut into several examples.
    pub split: usize,
    /// Records (or split pieces) left out: longer than `max_len` under `drop`, or with no target
    /// token left after truncation or splitting.
    pub dropped: usize,
    /// One line per skip or drop (the first few; the counts above are always complete).
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
        )
    }
}

/// Reads `path` (JSONL, or a `.json` file holding an array of records) into examples.
pub fn load_examples(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Example>, LoadReport), DataError> {
    if opts.max_len == 0 {
        return Err(DataError::msg("max_len must be at least 1"));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::file(path, format!("cannot read: {e}")))?;
    let records = split_records(path, &text)?;
    let mut conv = Converter::new(
        path,
        opts.format,
        opts.vocab_size,
        opts.tokenizer_dir.as_deref(),
    )?;
    let vocab = conv.vocab_size();
    let check = |line, r: Result<Example, DataError>| {
        r.and_then(|e| check_example(path, line, &e, vocab).map(|_| e))
    };
    // Records up to the first whose format is recognised go one by one (it fixes the format);
    // the rest are converted in parallel, and results are consumed in file order.
    let mut results = Vec::with_capacity(records.len());
    let mut first = 0;
    while first < records.len() && conv.format().is_none() {
        let (line, raw) = records[first];
        results.push(check(line, convert_record(&mut conv, line, raw)));
        first += 1;
    }
    if let Some(fatal) = conv.missing_tokenizer() {
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
                scope.spawn(move || {
                    part.iter()
                        .map(|&(line, raw)| check(line, convert_known(conv, line, raw)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            results.extend(h.join().expect("a conversion thread panicked"));
        }
    });
    let mut report = LoadReport::default();
    let mut examples = Vec::with_capacity(records.len());
    for (&(line, _), result) in records.iter().zip(results) {
        report.records += 1;
        match result {
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

/// Splits a file into `(1-based line, record text)`: one per non-blank line for JSONL, one per
/// element for a JSON array (a file ending in `.json` or starting with `[`).
fn split_records<'a>(path: &Path, text: &'a str) -> Result<Vec<(usize, &'a str)>, DataError> {
    let is_array =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('[');
    if !is_array {
        return Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect());
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
    Ok(out)
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
    if e.target_tokens() == 0 {
        return Err(DataError::at(
            path,
            line,
            Some("labels"),
            "nothing to train: every label after the first is -100",
        ));
    }
    Ok(())
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
