//! Arrow IPC input: the *stream* format HF `datasets` writes into its cache and its
//! `save_to_disk` directories, and the *file* format (`ARROW1`: pyarrow's `ipc.new_file`,
//! Feather v2), told apart by their magic bytes, lz4 or zstd compressed or not. Every row
//! becomes one JSON object through `table.rs`.
//!
//! Owns the conversion of Arrow values into JSON, column by column: strings (utf8, large,
//! view, dictionary-encoded), booleans, integers, floats (NaN and infinities become null, as
//! the Parquet reader makes them), null, lists (plain, large, fixed-size) and structs, nested in
//! any way. Any other type is an error naming the file, the column and the type; binary columns
//! are refused as not text. A stream must end with its end-of-stream marker: without it, the
//! file may have been cut at a message boundary, and rows would go missing silently.

use std::io::Cursor;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrowPrimitiveType, OffsetSizeTrait, RecordBatchReader};
use arrow_ipc::reader::{FileReader, StreamReader};
use arrow_schema::DataType;
use serde_json::{Map, Number, Value};

use crate::error::DataError;
use crate::table::Jsonl;

/// The first bytes of the IPC file format (and of Feather v2).
const FILE_MAGIC: &[u8] = b"ARROW1";
/// The first bytes of a stream's first message (since Arrow 0.15).
const CONTINUATION: &[u8] = &[0xFF; 4];
/// The last bytes of a complete stream: a continuation and a zero message length.
const END_OF_STREAM: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0];
/// The first bytes of Feather v1, a format of its own.
const FEATHER_V1: &[u8] = b"FEA1";

/// Whether `bytes` open an Arrow IPC file or stream (or a Feather v1 file, refused by name).
pub(crate) fn is_arrow(bytes: &[u8]) -> bool {
    [FILE_MAGIC, CONTINUATION, FEATHER_V1]
        .iter()
        .any(|m| bytes.starts_with(m))
}

/// Appends the rows of the Arrow IPC file `file` (its bytes: `bytes`) to `out`.
pub(crate) fn read_rows(file: &Path, bytes: &[u8], out: &mut Jsonl<'_>) -> Result<(), DataError> {
    let bad = |what: String| DataError::file(file, what);
    if bytes.starts_with(FEATHER_V1) {
        let why = "a Feather v1 file, which nopad does not read: write it again with pyarrow's \
                   feather.write_feather (version 2, the default)";
        return Err(bad(why.into()));
    }
    let is_file = bytes.starts_with(FILE_MAGIC);
    let reader: Box<dyn RecordBatchReader + '_> = if is_file {
        let r = FileReader::try_new(Cursor::new(bytes), None);
        Box::new(r.map_err(|e| bad(format!("not a readable Arrow IPC file: {e}")))?)
    } else {
        let r = StreamReader::try_new(Cursor::new(bytes), None);
        Box::new(r.map_err(|e| bad(format!("not a readable Arrow IPC stream (nor file): {e}")))?)
    };
    let schema = reader.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    out.check_columns(file, &names)?;
    for batch in reader {
        let read = out.next_line() - 1;
        let batch = batch.map_err(|e| {
            bad(format!(
                "cannot read the rows after row {read} of the data (is the file complete?): {e}"
            ))
        })?;
        let mut columns = Vec::with_capacity(names.len());
        for (name, array) in names.iter().zip(batch.columns()) {
            let values = column(array.as_ref(), name).map_err(|e| bad(e.to_string()))?;
            columns.push(values.into_iter());
        }
        for _ in 0..batch.num_rows() {
            let row = names.iter().zip(&mut columns);
            out.push(
                row.map(|(n, c)| (n.to_string(), c.next().unwrap_or(Value::Null)))
                    .collect(),
            );
        }
    }
    // A legacy stream (no continuation markers) ends with a zero length alone.
    let end = match bytes.starts_with(CONTINUATION) {
        true => END_OF_STREAM,
        false => &END_OF_STREAM[4..],
    };
    if !is_file && !bytes.ends_with(end) {
        return Err(bad(format!(
            "the stream stops after row {} of the data without its end-of-stream marker: the \
             file is truncated (or its writer was never closed)",
            out.next_line() - 1
        )));
    }
    Ok(())
}

/// A column (or a nested field: `messages[].role`) of a type nopad does not convert.
#[derive(Debug)]
struct Unsupported {
    at: String,
    ty: DataType,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Unsupported { at, ty } = self;
        let binary = matches!(
            ty,
            DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::FixedSizeBinary(_)
        );
        if binary {
            write!(f, "column `{at}` holds bytes ({ty}), not text")?;
        } else {
            write!(
                f,
                "column `{at}` has the type {ty}, which nopad does not convert (it reads \
                 strings, booleans, numbers, lists and structs of them)"
            )?;
        }
        f.write_str(": remove the column before saving the data (`ds.remove_columns([...])`)")
    }
}

/// The values of `array` (the column or field `at`), one JSON value per row.
fn column(array: &dyn Array, at: &str) -> Result<Vec<Value>, Unsupported> {
    let n = array.len();
    Ok(match array.data_type() {
        DataType::Null => vec![Value::Null; n],
        DataType::Boolean => array.as_boolean().iter().map(opt(Value::Bool)).collect(),
        DataType::Int8 => ints::<Int8Type>(array),
        DataType::Int16 => ints::<Int16Type>(array),
        DataType::Int32 => ints::<Int32Type>(array),
        DataType::Int64 => ints::<Int64Type>(array),
        DataType::UInt8 => ints::<UInt8Type>(array),
        DataType::UInt16 => ints::<UInt16Type>(array),
        DataType::UInt32 => ints::<UInt32Type>(array),
        DataType::UInt64 => ints::<UInt64Type>(array),
        DataType::Float16 => floats::<Float16Type>(array, f64::from),
        DataType::Float32 => floats::<Float32Type>(array, f64::from),
        DataType::Float64 => floats::<Float64Type>(array, |x| x),
        DataType::Utf8 => strings(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(array.as_string::<i64>().iter()),
        DataType::Utf8View => strings(array.as_string_view().iter()),
        DataType::List(_) => list(array.as_list::<i32>(), at)?,
        DataType::LargeList(_) => list(array.as_list::<i64>(), at)?,
        DataType::FixedSizeList(_, len) => {
            let a = array.as_fixed_size_list();
            let values = column(a.values().as_ref(), &format!("{at}[]"))?;
            let len = *len as usize;
            let ranges = (0..n).map(|i| {
                let start = a.value_offset_at(i);
                start..start + len
            });
            split(&values, ranges, a)
        }
        DataType::Struct(fields) => {
            let a = array.as_struct();
            let mut children = Vec::with_capacity(fields.len());
            for (f, child) in fields.iter().zip(a.columns()) {
                let values = column(child.as_ref(), &format!("{at}.{}", f.name()))?;
                children.push((f.name(), values.into_iter()));
            }
            (0..n)
                .map(|i| {
                    let fields = children.iter_mut().map(|(name, values)| {
                        (name.to_string(), values.next().unwrap_or(Value::Null))
                    });
                    let row: Map<String, Value> = fields.collect();
                    match a.is_null(i) {
                        true => Value::Null,
                        false => Value::Object(row),
                    }
                })
                .collect()
        }
        DataType::Dictionary(_, _) => {
            let a = array.as_any_dictionary();
            let values = column(a.values().as_ref(), at)?;
            if values.is_empty() {
                // Every key is null (the keys of an empty dictionary cannot point anywhere).
                return Ok(vec![Value::Null; n]);
            }
            let keys = a.normalized_keys();
            (0..n)
                .map(|i| match a.is_null(i) {
                    true => Value::Null,
                    false => values[keys[i]].clone(),
                })
                .collect()
        }
        ty => {
            return Err(Unsupported {
                at: at.to_string(),
                ty: ty.clone(),
            })
        }
    })
}

/// `f` of a present value, null for an absent one.
fn opt<T>(f: impl Fn(T) -> Value) -> impl Fn(Option<T>) -> Value {
    move |v| v.map_or(Value::Null, &f)
}

fn ints<T: ArrowPrimitiveType>(array: &dyn Array) -> Vec<Value>
where
    T::Native: Into<Number>,
{
    let a = array.as_primitive::<T>();
    a.iter()
        .map(opt(|x: T::Native| Value::Number(x.into())))
        .collect()
}

/// NaN and infinities have no JSON number: null, as Parquet rows give them.
fn floats<T: ArrowPrimitiveType>(array: &dyn Array, f: impl Fn(T::Native) -> f64) -> Vec<Value> {
    let number = |x| Number::from_f64(f(x)).map_or(Value::Null, Value::Number);
    array.as_primitive::<T>().iter().map(opt(number)).collect()
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
    values
        .map(opt(|s: &str| Value::String(s.to_string())))
        .collect()
}

/// Each row of a (large) list array: its slice of the child's values, or null.
fn list<O: OffsetSizeTrait>(
    a: &arrow_array::GenericListArray<O>,
    at: &str,
) -> Result<Vec<Value>, Unsupported> {
    let values = column(a.values().as_ref(), &format!("{at}[]"))?;
    let offsets = a.value_offsets();
    let ranges = offsets.windows(2).map(|w| w[0].as_usize()..w[1].as_usize());
    Ok(split(&values, ranges, a))
}

/// Row i of a list column: `values[ranges[i]]` as an array, or null where the row is null.
fn split(
    values: &[Value],
    ranges: impl Iterator<Item = std::ops::Range<usize>>,
    rows: &dyn Array,
) -> Vec<Value> {
    ranges
        .enumerate()
        .map(|(i, r)| match rows.is_null(i) {
            true => Value::Null,
            // The reader validates offsets against the child's length; `get` keeps a bug from
            // panicking all the same.
            false => Value::Array(values.get(r).unwrap_or_default().to_vec()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::types::Int32Type;
    use arrow_array::{
        ArrayRef, BinaryArray, DictionaryArray, FixedSizeListArray, Int32Array, RecordBatch,
        StringArray, StructArray, TimestampSecondArray,
    };
    use arrow_ipc::writer::StreamWriter;
    use arrow_schema::Field;
    use serde_json::json;

    use super::*;

    /// An IPC stream of `batches`, as arrow-rs writes it.
    fn stream(batches: &[RecordBatch]) -> Vec<u8> {
        let mut w = StreamWriter::try_new(Vec::new(), &batches[0].schema()).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        w.into_inner().unwrap()
    }

    /// The rows `read_rows` gives, parsed back.
    fn rows(bytes: &[u8], columns: &[(String, String)]) -> Result<Vec<Value>, DataError> {
        let mut out = Jsonl::new(columns);
        read_rows(Path::new("t.arrow"), bytes, &mut out)?;
        let text = out.finish();
        Ok(text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect())
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn every_type_pyarrow_wrote_converts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/types.arrow");
        let got = rows(&std::fs::read(path).unwrap(), &[]).unwrap();
        let first = json!({
            "utf8": "a", "large_utf8": null, "utf8_view": "c", "bool": true,
            "i8": -8, "i16": -16, "i32": -32, "i64": -1_099_511_627_776_i64,
            "u8": 8, "u16": 16, "u32": 32, "u64": 64,
            "f16": 1.5, "f32": 0.25, "f64": 0.1, "null": null,
            "list": [1, 2], "large_list": ["x"], "fixed_list": [1.0, 2.0],
            "struct": {"a": 1, "b": "one"},
            "turns": [{"role": "user", "content": "hi"}, null], "dict": "red",
        });
        // NaN and infinity have no JSON number: null, as Parquet gives them.
        let second = json!({
            "utf8": null, "large_utf8": "b", "utf8_view": "d", "bool": null,
            "i8": null, "i16": 16, "i32": 32, "i64": 1_099_511_627_776_i64,
            "u8": 255, "u16": 65535, "u32": 4_294_967_295_u64, "u64": u64::MAX,
            "f16": null, "f32": null, "f64": null, "null": null,
            "list": [], "large_list": null, "fixed_list": [3.0, null],
            "struct": null,
            "turns": [{"role": null, "content": "yo"}], "dict": "blue",
        });
        assert_eq!(got, [first, second]);
    }

    #[test]
    fn sliced_arrays_convert_from_their_offsets() {
        let mut turns = ListBuilder::new(StringBuilder::new());
        for row in [Some(vec!["a", "b"]), None, Some(vec!["c"]), Some(vec![])] {
            match row {
                Some(words) => {
                    words.iter().for_each(|w| turns.values().append_value(w));
                    turns.append(true);
                }
                None => turns.append(false),
            }
        }
        let turns: ArrayRef = Arc::new(turns.finish());
        let fixed = FixedSizeListArray::from_iter_primitive::<Int32Type, _, _>(
            [
                Some(vec![Some(1), Some(2)]),
                None,
                Some(vec![Some(3), None]),
                Some(vec![Some(4), Some(5)]),
            ],
            2,
        );
        let fields = vec![Arc::new(Field::new(
            "n",
            arrow_schema::DataType::Int32,
            true,
        ))];
        let ids: ArrayRef = Arc::new(Int32Array::from(vec![Some(1), None, Some(3), Some(4)]));
        let structs = StructArray::new(fields.into(), vec![ids], None);
        let dict: DictionaryArray<Int32Type> = [Some("x"), Some("y"), None, Some("x")]
            .into_iter()
            .collect();
        let cases: [(ArrayRef, Value); 4] = [
            (turns, json!([null, ["c"], []])),
            (Arc::new(fixed), json!([null, [3, null], [4, 5]])),
            (Arc::new(structs), json!([{"n": null}, {"n": 3}, {"n": 4}])),
            (Arc::new(dict), json!(["y", null, "x"])),
        ];
        for (array, want) in cases {
            let sliced = array.slice(1, 3);
            let got = column(sliced.as_ref(), "c").unwrap();
            assert_eq!(Value::Array(got), want, "{}", array.data_type());
        }
    }

    #[test]
    fn rows_count_across_batches_and_columns_are_renamed() {
        let b = |q: Vec<&str>| {
            let q: ArrayRef = Arc::new(StringArray::from(q));
            batch(vec![("question", q)])
        };
        let bytes = stream(&[b(vec!["one", "two"]), b(vec!["three"])]);
        let renamed = [("prompt".to_string(), "question".to_string())];
        let got = rows(&bytes, &renamed).unwrap();
        let want = ["one", "two", "three"].map(|q| json!({ "prompt": q }));
        assert_eq!(got, want);
        // The end-of-stream marker cut off: the stream may have lost rows, so it is refused.
        let e = rows(&bytes[..bytes.len() - 8], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.arrow: the stream stops after row 3 of the data without its end-of-stream \
             marker: the file is truncated (or its writer was never closed)"
        );
    }

    #[test]
    fn an_unsupported_type_names_the_file_the_column_and_the_type() {
        let when: ArrayRef = Arc::new(TimestampSecondArray::from(vec![1]));
        let meta = StructArray::try_from(vec![("when", when)]).unwrap();
        let e = rows(&stream(&[batch(vec![("meta", Arc::new(meta))])]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.arrow: column `meta.when` has the type Timestamp(s")
                && e.contains("remove_columns"),
            "{e}"
        );
        let image: ArrayRef = Arc::new(BinaryArray::from(vec![b"\x89PNG".as_ref()]));
        let image = StructArray::try_from(vec![("bytes", image)]).unwrap();
        let e = rows(&stream(&[batch(vec![("image", Arc::new(image))])]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.arrow: column `image.bytes` holds bytes (Binary), not text"),
            "{e}"
        );
        let e = rows(b"FEA1\0\0\0\0", &[]).unwrap_err().to_string();
        assert!(e.contains("Feather v1"), "{e}");
    }
}
