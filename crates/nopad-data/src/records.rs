//! Records: turns one parsed JSON record into an [`Example`], per [`Format`].
//!
//! Owns the field-level checks (missing field, wrong type) so that every message names the line
//! and the field. Formats made of text hand their strings to the model tokenizer in
//! `tokenize.rs`; this module decides which text is a target and which is not.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{json_kind, DataError};
use crate::load::{Format, LoadOptions};
use crate::Example;

/// Per-file conversion state: the format (forced or detected from the first record).
pub(crate) struct Converter<'a> {
    path: &'a Path,
    format: Option<Format>,
    vocab_size: Option<usize>,
}

impl<'a> Converter<'a> {
    pub(crate) fn new(path: &'a Path, opts: &LoadOptions) -> Result<Self, DataError> {
        Ok(Converter {
            path,
            format: opts.format,
            vocab_size: opts.vocab_size,
        })
    }

    /// The vocabulary size token ids are checked against.
    pub(crate) fn vocab_size(&self) -> Option<usize> {
        self.vocab_size
    }
}

/// Parses and converts the record at `line`.
pub(crate) fn convert_record(
    conv: &mut Converter,
    line: usize,
    raw: &str,
) -> Result<Example, DataError> {
    let path = conv.path;
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        let s = e.to_string();
        let what = s.rsplit_once(" at line ").map_or(s.as_str(), |(a, _)| a);
        DataError::at(
            path,
            line,
            None,
            format!("malformed JSON: {what} (column {})", e.column()),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(DataError::at(
            path,
            line,
            None,
            format!("expected a JSON object, found {}", json_kind(&value)),
        ));
    };
    let format = match conv.format {
        Some(f) => f,
        None => {
            let f = Format::detect(&obj).ok_or_else(|| {
                DataError::at(
                    path,
                    line,
                    None,
                    "cannot tell the record format: expected `input_ids`, `messages`, \
                     `prompt`+`completion`, `instruction`+`output` or `text` (or pass --format)",
                )
            })?;
            conv.format = Some(f);
            f
        }
    };
    let rec = Record {
        path,
        line,
        obj: &obj,
    };
    match format {
        Format::Pretokenized => {
            let input_ids = rec.int_array("input_ids")?;
            let labels = match obj.get("labels") {
                None | Some(Value::Null) => input_ids.clone(),
                Some(_) => rec.int_array("labels")?,
            };
            Ok(Example { input_ids, labels })
        }
        other => Err(DataError::at(
            path,
            line,
            None,
            format!("format `{other}` needs a tokenizer, which this build cannot load yet"),
        )),
    }
}

/// One record with its location, for field access with located errors.
pub(crate) struct Record<'r> {
    pub path: &'r Path,
    pub line: usize,
    pub obj: &'r Map<String, Value>,
}

#[allow(dead_code)] // string accessors serve the text formats
impl Record<'_> {
    pub(crate) fn err(&self, field: &str, msg: impl Into<String>) -> DataError {
        DataError::at(self.path, self.line, Some(field), msg)
    }

    fn get(&self, field: &str) -> Result<&Value, DataError> {
        self.obj
            .get(field)
            .ok_or_else(|| self.err(field, "missing"))
    }

    /// A required array of i32.
    pub(crate) fn int_array(&self, field: &str) -> Result<Vec<i32>, DataError> {
        let Value::Array(items) = self.get(field)? else {
            let v = self.get(field)?;
            return Err(self.err(
                field,
                format!("expected an array of integers, found {}", json_kind(v)),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| {
                        self.err(
                            field,
                            format!(
                                "expected an array of integers, found {} at index {i}",
                                if v.is_i64() || v.is_u64() {
                                    format!("{v}, which does not fit in 32 bits")
                                } else {
                                    json_kind(v).to_string()
                                }
                            ),
                        )
                    })
            })
            .collect()
    }

    /// A required string.
    pub(crate) fn string(&self, field: &str) -> Result<&str, DataError> {
        let v = self.get(field)?;
        v.as_str()
            .ok_or_else(|| self.err(field, format!("expected a string, found {}", json_kind(v))))
    }

    /// An optional string (missing or null gives "").
    pub(crate) fn opt_string(&self, field: &str) -> Result<&str, DataError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(""),
            Some(_) => self.string(field),
        }
    }
}
