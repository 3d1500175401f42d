//! [`DataError`]: what went wrong with a user's data, and where (file, 1-based line, field).
//!
//! Every error a user's file can cause goes through this type so that the message always has the
//! same shape: `data.jsonl:17: field `labels`: expected an array of integers, found a string`.

use std::fmt;
use std::path::{Path, PathBuf};

/// An error caused by input data or by options that do not fit the data.
#[derive(Debug, thiserror::Error)]
pub struct DataError {
    /// The file the error is in, if it came from a file.
    pub path: Option<PathBuf>,
    /// 1-based line (for `.json` arrays: the line where the record starts).
    pub line: Option<usize>,
    /// In a JSON array file: the 0-based index of the record at fault (records share lines).
    pub element: Option<usize>,
    /// The field of the record at fault, if one is.
    pub field: Option<String>,
    /// What was wrong and, where it helps, what to do.
    pub message: String,
    /// Set when loading stopped because a signal asked it to (its number), not because of the
    /// data: the caller exits as the signal asks rather than reporting bad data.
    pub signal: Option<i32>,
}

impl DataError {
    /// An error not tied to a file (bad options, bad in-memory examples).
    pub fn msg(message: impl Into<String>) -> Self {
        DataError {
            path: None,
            line: None,
            element: None,
            field: None,
            message: message.into(),
            signal: None,
        }
    }
    /// An error about a whole file (cannot read it, unknown format).
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError {
            path: Some(path.to_path_buf()),
            ..DataError::msg(message)
        }
    }
    /// An error at one line of a file, optionally about one field.
    pub fn at(path: &Path, line: usize, field: Option<&str>, message: impl Into<String>) -> Self {
        DataError {
            path: Some(path.to_path_buf()),
            line: Some(line),
            element: None,
            field: field.map(str::to_string),
            message: message.into(),
            signal: None,
        }
    }

    /// Loading `path` stopped at a signal's request.
    pub fn stopped(path: &Path, signal: i32) -> Self {
        DataError {
            signal: Some(signal),
            ..DataError::file(
                path,
                format!("data preparation stopped by signal {signal}; nothing was trained"),
            )
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}", p.display())?;
            if let Some(l) = self.line {
                write!(f, ":{l}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(i) = self.element {
            write!(f, "array element {i}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The JSON type name of a value, for "expected X, found Y" messages.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_and_field() {
        let e = DataError::at(
            Path::new("data.jsonl"),
            17,
            Some("labels"),
            "expected an array of integers, found a string",
        );
        assert_eq!(
            e.to_string(),
            "data.jsonl:17: field `labels`: expected an array of integers, found a string"
        );
        assert_eq!(DataError::msg("no examples").to_string(), "no examples");
    }
}
