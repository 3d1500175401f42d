//! Tabular input, the part Parquet and Arrow share: a table's rows become JSON Lines, one JSON
//! object per row, so they go through the same format detection, conversion and checks as a
//! JSONL file, and row r (1-based, counted over all the files of a dataset) is "line r" in every
//! message.
//!
//! Owns `--columns new=old,...`: columns renamed before conversion, for datasets whose fields are
//! not named the way a format expects (`prompt=question,completion=answer`). A mapped column that
//! a file lacks is an error naming the file's columns. Reading each file format is
//! `parquet.rs`' and `arrow.rs`' job.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::DataError;

/// The rows of a table (or of the files of a dataset, in order) as JSON Lines text, columns
/// renamed as `--columns` asks.
pub(crate) struct Jsonl<'a> {
    /// `(new, old)` pairs.
    columns: &'a [(String, String)],
    text: String,
    rows: usize,
}

impl<'a> Jsonl<'a> {
    pub(crate) fn new(columns: &'a [(String, String)]) -> Self {
        Jsonl {
            columns,
            text: String::new(),
            rows: 0,
        }
    }

    /// Checks that `file`, whose columns are `names`, has every column `--columns` maps.
    pub(crate) fn check_columns(&self, file: &Path, names: &[&str]) -> Result<(), DataError> {
        for (new, old) in self.columns {
            if !names.contains(&old.as_str()) {
                return Err(DataError::file(
                    file,
                    format!(
                        "--columns {new}={old}: the file has no column `{old}` (its columns: {})",
                        names.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The 1-based line the next row will have.
    pub(crate) fn next_line(&self) -> usize {
        self.rows + 1
    }

    /// Appends one row, its columns renamed.
    pub(crate) fn push(&mut self, mut row: Map<String, Value>) {
        for (new, old) in self.columns {
            if let Some(v) = row.remove(old) {
                row.insert(new.clone(), v);
            }
        }
        self.text.push_str(&Value::Object(row).to_string());
        self.text.push('\n');
        self.rows += 1;
    }

    pub(crate) fn finish(self) -> String {
        self.text
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        }
    }

    #[test]
    fn rows_are_renamed_and_counted() {
        let cols = parse_columns("prompt=question, completion=answer").unwrap();
        let mut out = Jsonl::new(&cols);
        assert_eq!(out.next_line(), 1);
        out.push(obj(json!({"question": "q", "answer": "a", "id": 3})));
        out.push(obj(json!({"question": "r", "answer": null})));
        assert_eq!(out.next_line(), 3);
        let lines: Vec<Value> = out
            .finish()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                json!({"prompt": "q", "completion": "a", "id": 3}),
                json!({"prompt": "r", "completion": null})
            ]
        );
    }

    #[test]
    fn a_mapped_column_the_file_lacks_is_named_with_those_it_has() {
        let cols = parse_columns("prompt=query").unwrap();
        let out = Jsonl::new(&cols);
        let e = out
            .check_columns(Path::new("d.arrow"), &["question", "answer"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "d.arrow: --columns prompt=query: the file has no column `query` (its columns: \
             question, answer)"
        );
        assert!(out.check_columns(Path::new("d.arrow"), &["query"]).is_ok());
        assert!(parse_columns("prompt").unwrap_err().contains("NEW=OLD"));
        assert!(parse_columns("=x").is_err());
        assert_eq!(parse_columns(" , ").unwrap(), vec![]);
    }
}
