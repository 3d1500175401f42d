//! What `nopad inspect` shows of a file before any training: its first records converted
//! exactly as loading converts them, each with the text its ids were made from (the text, the
//! prompt and completion joined, the conversation as the template renders it) and the trained
//! parts of that text marked.
//!
//! Owns the view, not the conversion: records go through the same `Converter` that
//! [`load_examples`](crate::load_examples) uses, so what is shown is what trains.

use std::path::Path;

use crate::error::DataError;
use crate::load::{check_example, read_text, split_records, LoadOptions};
use crate::records::{convert_record, Converter, Format};
use crate::targets::Shown;
use crate::tokenize::ModelTokenizer;
use crate::{Example, IGNORE_INDEX};

/// One record as loading converts it.
#[derive(Debug)]
pub struct Inspected {
    /// The record's 1-based line (for arrays, the line where its element starts).
    pub line: usize,
    /// Its example before the long-example policy, or why loading refuses (or, with
    /// `skip_bad`, skips) it.
    pub example: Result<Example, DataError>,
    /// The text the ids were made from (`None` for pretokenized records).
    pub shown: Option<Shown>,
}

/// The first records of a file and what is needed to show them.
#[derive(Debug)]
pub struct Inspection {
    /// The records, in file order.
    pub records: Vec<Inspected>,
    /// The file's format (forced, or detected from its first record), if known.
    pub format: Option<Format>,
    tokenizer: Option<ModelTokenizer>,
}

/// The first `n` records of `path` (blank lines aside; lines that are not UTF-8 included, as
/// errors), converted under `opts` as [`load_examples`](crate::load_examples) converts them.
/// Errors are those of the whole file: it cannot be read, or holds no records at all.
pub fn inspect_records(path: &Path, opts: &LoadOptions, n: usize) -> Result<Inspection, DataError> {
    let (text, undecodable) = read_text(path, &opts.columns)?;
    let (records, is_array) = split_records(path, &text)?;
    let mut conv = Converter::new(path, opts, true)?;
    // Records and undecodable lines in file order: `Ok(index into records)` or the line's error.
    let mut raw: Vec<(usize, Result<usize, DataError>)> = (0..records.len())
        .map(|i| (records[i].0, Ok(i)))
        .chain(undecodable.into_iter().map(|(line, e)| (line, Err(e))))
        .collect();
    raw.sort_by_key(|r| r.0);
    let mut out = vec![];
    for (line, index) in raw.into_iter().take(n) {
        let i = match index {
            Ok(i) => i,
            Err(e) => {
                out.push(Inspected {
                    line,
                    example: Err(e),
                    shown: None,
                });
                continue;
            }
        };
        let built = convert_record(&mut conv, line, records[i].1).and_then(|b| {
            check_example(path, line, &b.example, conv.vocab_size())?;
            Ok(b)
        });
        let (example, shown) = match built {
            Ok(b) => (Ok(b.example), b.shown),
            Err(mut e) => {
                e.element = is_array.then_some(i);
                (Err(e), None)
            }
        };
        out.push(Inspected {
            line,
            example,
            shown,
        });
    }
    if out.is_empty() {
        return Err(DataError::file(path, "no records: the file is empty"));
    }
    Ok(Inspection {
        records: out,
        format: conv.format(),
        tokenizer: conv.into_tokenizer(),
    })
}

impl Inspection {
    /// The token an id stands for, if the model's tokenizer knows it.
    pub fn token(&self, id: i32) -> Option<String> {
        self.tokenizer.as_ref()?.token(id)
    }

    /// The text of `rec` with each run of trained text between `open` and `close`; ids added as
    /// ids (BOS, a final EOS) are written as their tokens. `None` for records shown as ids only.
    pub fn marked(&self, rec: &Inspected, (open, close): (&str, &str)) -> Option<String> {
        let (Ok(e), Some(shown)) = (&rec.example, &rec.shown) else {
            return None;
        };
        // Runs of (text, trained); text no token covers (a separator the pre-tokenizer drops)
        // is trained when the tokens on both sides are.
        let mut runs: Vec<(String, bool)> = vec![];
        let mut push = |text: &str, trained: bool| match runs.last_mut() {
            Some(last) if last.1 == trained => last.0.push_str(text),
            _ if text.is_empty() => {}
            _ => runs.push((text.to_string(), trained)),
        };
        let trained = |i: usize| e.labels[i] != IGNORE_INDEX;
        let mut cursor = 0;
        for (i, (&id, span)) in e.input_ids.iter().zip(&shown.spans).enumerate() {
            match *span {
                Some((start, end)) => {
                    if start > cursor {
                        let gap = i > 0 && trained(i - 1) && trained(i);
                        push(&shown.text[cursor..start], gap);
                    }
                    // Tokens of one character (byte fallback) share its span: written once.
                    let from = start.max(cursor);
                    if end > from {
                        push(&shown.text[from..end], trained(i));
                        cursor = end;
                    }
                }
                None => push(&self.token(id).unwrap_or_default(), trained(i)),
            }
        }
        push(&shown.text[cursor.min(shown.text.len())..], false);
        let mut out = String::new();
        for (text, trained) in runs {
            if trained {
                out.push_str(open);
                out.push_str(&text);
                out.push_str(close);
            } else {
                out.push_str(&text);
            }
        }
        Some(out)
    }
}
