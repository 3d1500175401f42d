//! Parquet input (`.parquet`, the format HF `datasets` stores and publishes): every row becomes
//! one JSON record through `table.rs`. Nested columns come out as JSON: a `messages` column of
//! `list<struct<role, content>>` is a conversation as in JSONL.

use std::fs::File;
use std::path::Path;

use crate::error::DataError;
use crate::table::Jsonl;
use parquet::file::reader::{FileReader, SerializedFileReader};

/// Appends the rows of the Parquet file `path` to `out`.
pub(crate) fn read_rows(path: &Path, out: &mut Jsonl<'_>) -> Result<(), DataError> {
    let bad = |what: String| DataError::file(path, what);
    let file = File::open(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let fields = schema.root_schema().get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    out.check_columns(path, &names)?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read its rows: {e}")))?;
    for row in rows {
        let row = row.map_err(|e| {
            DataError::at(path, out.next_line(), None, format!("unreadable row: {e}"))
        })?;
        let obj = row.get_column_iter();
        out.push(obj.map(|(k, v)| (k.clone(), v.to_json_value())).collect());
    }
    Ok(())
}
