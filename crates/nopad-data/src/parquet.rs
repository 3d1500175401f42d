//! Parquet input (`.parquet`, the format HF `datasets` stores and publishes): every row becomes
//! one JSON record, so rows go through the same format detection, conversion and checks as JSON
//! Lines, and row r (1-based) is "line r" in every message. Nested columns come out as JSON: a
//! `messages` column of `list<struct<role, content>>` is a conversation as in JSONL.
//!
//! `--columns new=old,...` renames columns first, for datasets whose fields are not named the
//! way a format expects (`prompt=question,completion=answer`); a mapped column that the file
//! lacks is an error naming the file's columns.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::error::DataError;

/// Whether `path` names a Parquet file (by its extension).
pub(crate) fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The rows of the Parquet file `path` as JSON Lines text, columns renamed by `columns`
/// (`(new, old)` pairs).
pub(crate) fn to_jsonl(path: &Path, columns: &[(String, String)]) -> Result<String, DataError> {
    let bad = |what: String| DataError::file(path, what);
    let file = File::open(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for (new, old) in columns {
        if !names.contains(old) {
            return Err(bad(format!(
                "--columns {new}={old}: the file has no column `{old}` (its columns: {})",
                names.join(", ")
            )));
        }
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read its rows: {e}")))?;
    let mut text = String::new();
    for (i, row) in rows.enumerate() {
        let row =
            row.map_err(|e| DataError::at(path, i + 1, None, format!("unreadable row: {e}")))?;
        let mut value = row.to_json_value();
        if let Value::Object(obj) = &mut value {
            for (new, old) in columns {
                if let Some(v) = obj.remove(old) {
                    obj.insert(new.clone(), v);
                }
            }
        }
        text.push_str(&value.to_string());
        text.push('\n');
    }
    Ok(text)
}

/// Parses `--columns new=old,new2=old2` into `(new, old)` pairs.
pub fn parse_columns(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((new, old)) if !new.trim().is_empty() && !old.trim().is_empty() => {
                Ok((new.trim().to_string(), old.trim().to_string()))
            }
            _ => Err(format!(
                "`{p}`: expected NEW=OLD (the field nopad reads = the file's column), e.g. \
                 prompt=question,completion=answer"
            )),
        })
        .collect()
}
