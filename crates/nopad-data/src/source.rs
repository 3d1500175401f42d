//! What a `--data` path names, its bytes, and its text: a JSON Lines or `.json` file, a Parquet
//! file, an Arrow IPC file (stream or file format), or a directory HF `datasets`' `save_to_disk`
//! wrote (its Arrow files in order, `saved.rs`). A file's kind is told by its first bytes (Arrow's
//! `ARROW1` or stream marker, Parquet's `PAR1`), else by its extension (`.parquet`; `.arrow`,
//! `.arrows`, `.feather`, `.ipc`), else it is text. Tables become JSON Lines (`table.rs`).
//!
//! Owns text decoding too: a UTF-8 byte-order mark is stripped, and a line that is not UTF-8 is
//! a bad record of its own.

use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::table::Jsonl;

/// How a data file's bytes are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Parquet,
    Arrow,
}

/// A data source read into memory: its kind and each of its files with their bytes, in the
/// dataset's order (one file, except for a saved dataset's directory).
pub(crate) struct Source {
    kind: Kind,
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// Text, and its lines that are not UTF-8 as errors (`(1-based line, error)`).
pub(crate) type Text = (String, Vec<(usize, DataError)>);

impl Source {
    /// Reads what `path` names.
    pub(crate) fn read(path: &Path) -> Result<Source, DataError> {
        if let Some(files) = crate::saved::data_files(path)? {
            let files = files
                .into_iter()
                .map(|f| read_bytes(&f).map(|b| (f, b)))
                .collect::<Result<_, _>>()?;
            return Ok(Source {
                kind: Kind::Arrow,
                files,
            });
        }
        let bytes = read_bytes(path)?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let ext = ext.to_ascii_lowercase();
        let kind = if crate::arrow::is_arrow(&bytes) {
            Kind::Arrow
        } else if bytes.starts_with(b"PAR1") || ext == "parquet" {
            Kind::Parquet
        } else if ["arrow", "arrows", "feather", "ipc"].contains(&ext.as_str()) {
            Kind::Arrow
        } else {
            Kind::Text
        };
        Ok(Source {
            kind,
            files: vec![(path.to_path_buf(), bytes)],
        })
    }

    /// The bytes of each file, in order (what the dataset cache's key hashes).
    pub(crate) fn bytes(&self) -> Vec<&[u8]> {
        self.files.iter().map(|(_, b)| b.as_slice()).collect()
    }

    /// The source as text (see [`decode`]), a table's rows as JSON Lines with their columns
    /// renamed by `columns` (`(new, old)` pairs). `path` is the path the user gave.
    pub(crate) fn into_text(
        self,
        path: &Path,
        columns: &[(String, String)],
    ) -> Result<Text, DataError> {
        let mut out = Jsonl::new(columns);
        for (file, bytes) in self.files {
            match self.kind {
                Kind::Text => return decode_checked(path, bytes),
                Kind::Parquet => crate::parquet::read_rows(&file, &mut out)?,
                Kind::Arrow => crate::arrow::read_rows(&file, &bytes, &mut out)?,
            }
        }
        Ok((out.finish(), vec![]))
    }
}

/// The files whose bytes make the data `path` names, in order: `path` itself for a file, the
/// Arrow files of a directory `save_to_disk` wrote (`DIR`, `DIR:SPLIT`). What a run's identity
/// checksums; an error names what is wrong with a directory.
pub fn data_files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(crate::saved::data_files(path)?.unwrap_or_else(|| vec![path.to_path_buf()]))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::file(path, format!("cannot read: {e}")))
}

/// [`decode`], refusing an array with a line that is not UTF-8.
fn decode_checked(path: &Path, bytes: Vec<u8>) -> Result<Text, DataError> {
    let (text, mut undecodable) = decode(path, bytes);
    if !undecodable.is_empty() && text.trim_start().starts_with('[') {
        return Err(undecodable.swap_remove(0).1);
    }
    Ok((text, undecodable))
}

/// The UTF-8 byte-order mark some editors write at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The text of a file, its byte-order mark stripped. A line that is not UTF-8 becomes a blank
/// line (so line numbers stay true) and an error naming it, returned beside the text.
fn decode(path: &Path, mut bytes: Vec<u8>) -> Text {
    if bytes.starts_with(BOM) {
        bytes.drain(..BOM.len());
    }
    let bytes = match String::from_utf8(bytes) {
        Ok(text) => return (text, vec![]),
        Err(e) => e.into_bytes(),
    };
    let mut text = String::with_capacity(bytes.len());
    let mut bad = vec![];
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            text.push('\n');
        }
        match std::str::from_utf8(line) {
            Ok(l) => text.push_str(l),
            Err(e) => bad.push((
                i + 1,
                DataError::at(
                    path,
                    i + 1,
                    None,
                    format!(
                        "not valid UTF-8 (byte {} of the line); the file must be UTF-8 text",
                        e.valid_up_to() + 1
                    ),
                ),
            )),
        }
    }
    (text, bad)
}
