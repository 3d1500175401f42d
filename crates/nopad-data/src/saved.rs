//! Directories written by HF `datasets`' `save_to_disk`: which Arrow files hold a dataset's
//! rows, and in which order. A `Dataset` directory's `state.json` lists its files
//! (`_data_files`, read in that order); a `DatasetDict` directory's `dataset_dict.json` lists
//! its splits, each a `Dataset` directory of its own. `DIR` names a DatasetDict's `train`
//! split, `DIR:SPLIT` (or the split's own directory, `DIR/SPLIT`) any split.
//!
//! Both JSON files come from the user: a file name that would leave the directory, or a split
//! that is not listed, is refused with the file and field named.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::error::DataError;

/// The split `DIR` alone names in a DatasetDict.
const DEFAULT_SPLIT: &str = "train";

/// The Arrow files of the saved dataset `path` names, in order: `path` is a directory, or
/// `DIR:SPLIT` where no file has that name and `DIR` is a directory. `None` when `path` names
/// neither (a file, or nothing).
pub(crate) fn data_files(path: &Path) -> Result<Option<Vec<PathBuf>>, DataError> {
    if path.is_dir() {
        return dataset_files(path, None).map(Some);
    }
    if path.exists() {
        return Ok(None);
    }
    let split = path.to_str().and_then(|s| s.rsplit_once(':'));
    match split {
        Some((dir, split)) if Path::new(dir).is_dir() => {
            dataset_files(Path::new(dir), Some(split)).map(Some)
        }
        _ => Ok(None),
    }
}

/// The files of the directory `dir`: a Dataset's, or the split `split` (default `train`) of a
/// DatasetDict.
fn dataset_files(dir: &Path, split: Option<&str>) -> Result<Vec<PathBuf>, DataError> {
    let dict = dir.join("dataset_dict.json");
    let state = dir.join("state.json");
    if dict.is_file() {
        let splits = read_names(&dict, "splits", |v| v.as_str().map(str::to_string))?;
        let name = split.unwrap_or(DEFAULT_SPLIT);
        if !splits.iter().any(|s| s == name) {
            let what = match split {
                Some(_) => format!("has no split `{name}`"),
                None => format!("has no `{DEFAULT_SPLIT}` split: name one as DIR:SPLIT"),
            };
            return Err(DataError::file(
                dir,
                format!("{what} (its splits: {})", splits.join(", ")),
            ));
        }
        let split_dir = inside(dir, &dict, "splits", name)?;
        return state_files(&split_dir, &split_dir.join("state.json"));
    }
    if state.is_file() {
        if let Some(split) = split {
            return Err(DataError::file(
                dir,
                format!(
                    "`:{split}`: this directory holds one dataset (state.json), not a \
                     DatasetDict with splits; name the directory alone"
                ),
            ));
        }
        return state_files(dir, &state);
    }
    Err(DataError::file(
        dir,
        "a directory is read only as `datasets`' save_to_disk writes it, with a state.json (a \
         Dataset) or a dataset_dict.json (a DatasetDict), and this one has neither; name a data \
         file instead",
    ))
}

/// The data files `state.json` lists (`_data_files: [{"filename": ...}]`), in its order.
fn state_files(dir: &Path, state: &Path) -> Result<Vec<PathBuf>, DataError> {
    let field = "_data_files";
    let names = read_names(state, field, |v| {
        v.get("filename")
            .and_then(Value::as_str)
            .map(str::to_string)
    })?;
    if names.is_empty() {
        return Err(field_error(state, field, "lists no data file"));
    }
    names.iter().map(|n| inside(dir, state, field, n)).collect()
}

/// The entries of the array `field` of the JSON file `file`, each read by `entry`.
fn read_names(
    file: &Path,
    field: &str,
    entry: impl Fn(&Value) -> Option<String>,
) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| DataError::file(file, format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| DataError::at(file, e.line(), None, format!("not JSON: {e}")))?;
    let expected = match field {
        "splits" => "an array of split names",
        _ => "an array of {\"filename\": ...} objects",
    };
    let entries = json.get(field).and_then(Value::as_array);
    let entries =
        entries.ok_or_else(|| field_error(file, field, &format!("expected {expected}")))?;
    entries
        .iter()
        .map(|v| entry(v).ok_or_else(|| field_error(file, field, &format!("expected {expected}"))))
        .collect()
}

/// `dir/name`, where `name` (from `field` of `file`) must be one plain name: a saved dataset's
/// files and splits all lie directly in its directory.
fn inside(dir: &Path, file: &Path, field: &str, name: &str) -> Result<PathBuf, DataError> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(dir.join(name)),
        _ => Err(field_error(
            file,
            field,
            &format!("`{name}` is not a name inside the directory"),
        )),
    }
}

fn field_error(file: &Path, field: &str, message: &str) -> DataError {
    DataError {
        field: Some(field.to_string()),
        ..DataError::file(file, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nopad-saved-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for (f, text) in files {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    const STATE: &str = r#"{"_data_files": [{"filename": "b.arrow"}, {"filename": "a.arrow"}]}"#;

    #[test]
    fn state_json_lists_the_files_in_its_order() {
        let d = dir("state", &[("state.json", STATE)]);
        let files = data_files(&d).unwrap().unwrap();
        assert_eq!(files, [d.join("b.arrow"), d.join("a.arrow")]);
        let e = data_files(Path::new(&format!("{}:test", d.display())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a DatasetDict"), "{e}");
    }

    #[test]
    fn a_dataset_dict_gives_train_or_the_split_named() {
        let d = dir(
            "dict",
            &[
                ("dataset_dict.json", r#"{"splits": ["train", "test"]}"#),
                ("train/state.json", STATE),
                (
                    "test/state.json",
                    r#"{"_data_files": [{"filename": "t.arrow"}]}"#,
                ),
            ],
        );
        let train = data_files(&d).unwrap().unwrap();
        assert_eq!(train[0], d.join("train").join("b.arrow"));
        let test = data_files(Path::new(&format!("{}:test", d.display())));
        assert_eq!(test.unwrap().unwrap(), [d.join("test").join("t.arrow")]);
        let e = data_files(Path::new(&format!("{}:valid", d.display())))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no split `valid`") && e.contains("its splits: train, test"),
            "{e}"
        );
        let no_train = dir(
            "dict-no-train",
            &[("dataset_dict.json", r#"{"splits": ["a"]}"#)],
        );
        let e = data_files(&no_train).unwrap_err().to_string();
        assert!(
            e.contains("no `train` split") && e.contains("DIR:SPLIT"),
            "{e}"
        );
    }

    #[test]
    fn bad_state_files_are_refused_by_field() {
        for (state, want) in [
            (
                r#"{"_data_files": [{"filename": "../x.arrow"}]}"#,
                "not a name inside",
            ),
            (
                r#"{"_data_files": [{"filename": "/x.arrow"}]}"#,
                "not a name inside",
            ),
            (r#"{"_data_files": []}"#, "lists no data file"),
            (
                r#"{"_data_files": [{"file": "x"}]}"#,
                "expected an array of",
            ),
            (r#"{"other": 1}"#, "expected an array of"),
        ] {
            let d = dir("bad", &[("state.json", state)]);
            let e = data_files(&d).unwrap_err().to_string();
            assert!(
                e.contains("state.json: field `_data_files`") && e.contains(want),
                "{state}: {e}"
            );
        }
        let d = dir("bad-json", &[("state.json", "{")]);
        assert!(data_files(&d).unwrap_err().to_string().contains("not JSON"));
        let d = dir("plain", &[("x.jsonl", "{}")]);
        let e = data_files(&d).unwrap_err().to_string();
        assert!(e.contains("neither"), "{e}");
        assert!(data_files(&d.join("x.jsonl")).unwrap().is_none());
        assert!(data_files(&d.join("missing:train")).unwrap().is_none());
    }
}
