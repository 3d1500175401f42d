//! Records: the record [`Format`]s (and their detection from a record's keys), and turning one
//! parsed JSON record into an [`Example`] per format.
//!
//! Owns the field-level checks (missing field, wrong type) so that every message names the line
//! and the field, and which text of a record is prompt and which completion. Formats made of
//! text hand their strings to `targets.rs`, which tokenises them and marks the targets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{json_kind, DataError};
use crate::load::LoadOptions;
use crate::messages::{conversation, MESSAGES, SHAREGPT};
use crate::targets::{self, Built};
use crate::tokenize::ModelTokenizer;
use crate::Example;

/// The shape of the records in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `{"input_ids": [...], "labels": [...]?}`; labels default to the input ids.
    Pretokenized,
    /// `{"text": "..."}`: every token trained, EOS appended (BOS per the tokenizer).
    Text,
    /// `{"prompt": "...", "completion": "..."}`: loss on the completion and EOS.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, ...]}` rendered with the chat template.
    Messages,
    /// ShareGPT: `{"conversations": [{"from", "value"}, ...]}`, read as messages.
    ShareGpt,
    /// `{"instruction", "input"?, "output"}`.
    Alpaca,
}

impl Format {
    /// Every format, in the order detection tries them.
    pub const ALL: [Format; 6] = [
        Format::Pretokenized,
        Format::Messages,
        Format::ShareGpt,
        Format::PromptCompletion,
        Format::Alpaca,
        Format::Text,
    ];
    /// The name used with `--format`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Pretokenized => "pretokenized",
            Format::Text => "text",
            Format::PromptCompletion => "prompt-completion",
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
            Format::Alpaca => "alpaca",
        }
    }
    /// Whether records of this format need a tokenizer.
    pub fn needs_tokenizer(self) -> bool {
        self != Format::Pretokenized
    }
    /// The format a record's keys announce, if any.
    pub fn detect(record: &serde_json::Map<String, Value>) -> Option<Format> {
        let has = |k: &str| record.contains_key(k);
        if has("input_ids") {
            Some(Format::Pretokenized)
        } else if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// `Display` as the name the flag takes.
macro_rules! display_by_name {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    )*};
}
display_by_name!(Format, LossOn);

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        match s.as_str() {
            "pretokenized" | "tokens" => Ok(Format::Pretokenized),
            "text" => Ok(Format::Text),
            "prompt-completion" => Ok(Format::PromptCompletion),
            "messages" | "chat" => Ok(Format::Messages),
            "sharegpt" => Ok(Format::ShareGpt),
            "alpaca" => Ok(Format::Alpaca),
            _ => Err(format!(
                "unknown format `{s}` (expected one of: pretokenized, text, prompt-completion, \
                 messages, sharegpt, alpaca)"
            )),
        }
    }
}

/// Which tokens are targets (TRL's `assistant_only_loss`, `completion_only_loss`, or neither).
/// Each format has a default ([`LossOn::default_for`]) and refuses the values that mean
/// nothing for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossOn {
    /// The assistant turns of a conversation (messages, sharegpt, alpaca through a chat
    /// template): their content and end-of-turn tokens.
    Assistant,
    /// The completion of prompt/completion data (and the output of alpaca data), and EOS.
    Completion,
    /// Every token (the first is never a target: nothing predicts it).
    All,
}

impl LossOn {
    /// The name used with `--loss-on`.
    pub fn name(self) -> &'static str {
        match self {
            LossOn::Assistant => "assistant",
            LossOn::Completion => "completion",
            LossOn::All => "all",
        }
    }

    /// What `format` trains on when `--loss-on` is not given: labels as given for pretokenized
    /// data, every token of text, the completion of prompt/completion data, the assistant turns
    /// of conversations (alpaca: its output, whichever way it is rendered).
    pub fn default_for(format: Format) -> LossOn {
        match format {
            Format::Pretokenized | Format::Text => LossOn::All,
            Format::PromptCompletion => LossOn::Completion,
            Format::Messages | Format::ShareGpt | Format::Alpaca => LossOn::Assistant,
        }
    }

    /// The values `format` accepts (alpaca's output is both a completion and an assistant turn).
    fn accepted_by(format: Format) -> &'static [LossOn] {
        match format {
            Format::Pretokenized | Format::Text => &[LossOn::All],
            Format::PromptCompletion => &[LossOn::Completion, LossOn::All],
            Format::Messages | Format::ShareGpt => &[LossOn::Assistant, LossOn::All],
            Format::Alpaca => &[LossOn::Assistant, LossOn::Completion, LossOn::All],
        }
    }

    /// Refuses a value that makes no sense for `format`, saying which ones do.
    pub fn check(self, format: Format) -> Result<(), String> {
        let ok = LossOn::accepted_by(format);
        if ok.contains(&self) {
            return Ok(());
        }
        let names: Vec<&str> = ok.iter().map(|l| l.name()).collect();
        Err(format!(
            "--loss-on {self} does not apply to records in format `{format}` (it accepts: {})",
            names.join(", ")
        ))
    }
}

impl FromStr for LossOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "assistant" => Ok(LossOn::Assistant),
            "completion" => Ok(LossOn::Completion),
            "all" => Ok(LossOn::All),
            _ => Err(format!(
                "unknown loss-on `{s}` (expected assistant, completion or all)"
            )),
        }
    }
}

/// Per-file conversion state: the format (forced or detected from the first record) and the
/// model tokenizer, loaded once.
pub(crate) struct Converter<'a> {
    path: &'a Path,
    format: Option<Format>,
    vocab_size: Option<usize>,
    tokenizer: Option<ModelTokenizer>,
    /// The model directory given for the tokenizer, named when it has no tokenizer.json.
    tokenizer_dir: Option<PathBuf>,
    /// `None`: the format's default.
    loss_on: Option<LossOn>,
    /// Keep each record's text and token spans (`nopad inspect`).
    explain: bool,
}

impl<'a> Converter<'a> {
    /// The converter of `path` under `opts`: the format forced or detected from the first
    /// record, token ids checked against `vocab_size`, else the tokenizer's vocabulary if the
    /// model directory has one, its chat template replaced by `opts.chat_template` when given;
    /// `explain` keeps each record's text.
    pub(crate) fn new(
        path: &'a Path,
        opts: &LoadOptions,
        explain: bool,
    ) -> Result<Self, DataError> {
        let tokenizer_dir = opts.tokenizer_dir.as_deref();
        // A model directory without tokenizer.json is fine for pretokenized data; formats that
        // need a tokenizer then fail with `missing_tokenizer`.
        let tokenizer = tokenizer_dir
            .filter(|d| d.join("tokenizer.json").exists())
            .map(|d| ModelTokenizer::load_with_template(d, opts.chat_template.as_deref()))
            .transpose()?;
        Ok(Converter {
            path,
            format: opts.format,
            vocab_size: opts
                .vocab_size
                .or(tokenizer.as_ref().map(ModelTokenizer::vocab_size)),
            tokenizer,
            tokenizer_dir: tokenizer_dir.map(Path::to_path_buf),
            loss_on: opts.loss_on,
            explain,
        })
    }

    /// The model's tokenizer, if one was loaded.
    pub(crate) fn into_tokenizer(self) -> Option<ModelTokenizer> {
        self.tokenizer
    }

    /// The file's format, once known.
    pub(crate) fn format(&self) -> Option<Format> {
        self.format
    }

    /// The vocabulary size token ids are checked against.
    pub(crate) fn vocab_size(&self) -> Option<usize> {
        self.vocab_size
    }

    /// The errors no `--skip-bad` may swallow, since every record would fail: the file's format
    /// needs a tokenizer and none was given (or the model directory has no tokenizer.json), or
    /// `--loss-on` means nothing for the format.
    pub(crate) fn fatal(&self) -> Option<DataError> {
        let f = self.format?;
        if let Some(Err(e)) = self.loss_on.map(|l| l.check(f)) {
            return Some(DataError::file(self.path, e));
        }
        if !f.needs_tokenizer() || self.tokenizer.is_some() {
            return None;
        }
        let msg = match &self.tokenizer_dir {
            Some(dir) => format!(
                "records are in format `{f}`, which needs the model's tokenizer, but the model \
                 directory {} has no tokenizer.json (copy the tokenizer files of the base \
                 model there, or pass pretokenized data)",
                dir.display()
            ),
            None => format!(
                "records are in format `{f}`, which needs the model's tokenizer: pass the \
                 model directory holding tokenizer.json (--model DIR)"
            ),
        };
        Some(DataError::file(self.path, msg))
    }

    /// Whether every token is a target (`--loss-on all`).
    fn trains_all(&self) -> bool {
        self.loss_on == Some(LossOn::All)
    }
}

/// Parses and converts the record at `line`, detecting the file's format from it if no earlier
/// record did.
pub(crate) fn convert_record(
    conv: &mut Converter,
    line: usize,
    raw: &str,
) -> Result<Built, DataError> {
    let obj = parse(conv.path, line, raw)?;
    if conv.format.is_none() {
        let f = Format::detect(&obj).ok_or_else(|| {
            DataError::at(
                conv.path,
                line,
                None,
                "cannot tell the record format: expected `input_ids`, `messages`, \
                 `conversations`, `prompt`+`completion`, `instruction`+`output` or `text` (or pass --format)",
            )
        })?;
        conv.format = Some(f);
    }
    convert_object(conv, line, &obj)
}

/// Converts a record once the format is known; `&Converter` only, so threads can share it.
pub(crate) fn convert_known(conv: &Converter, line: usize, raw: &str) -> Result<Built, DataError> {
    let obj = parse(conv.path, line, raw)?;
    convert_object(conv, line, &obj)
}

fn parse(path: &Path, line: usize, raw: &str) -> Result<Map<String, Value>, DataError> {
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
    match value {
        Value::Object(obj) => Ok(obj),
        v => Err(DataError::at(
            path,
            line,
            None,
            format!("expected a JSON object, found {}", json_kind(&v)),
        )),
    }
}

fn convert_object(
    conv: &Converter,
    line: usize,
    obj: &Map<String, Value>,
) -> Result<Built, DataError> {
    let path = conv.path;
    let format = conv.format.expect("the format is known before conversion");
    let rec = Record { path, line, obj };
    if let Some(e) = conv.fatal() {
        return Err(e);
    }
    let (all, explain) = (conv.trains_all(), conv.explain);
    if format == Format::Pretokenized {
        let input_ids = rec.int_array("input_ids")?;
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => input_ids.clone(),
            // `--loss-on all` trains every token whatever the labels say.
            Some(_) if all => input_ids.clone(),
            Some(_) => rec.int_array("labels")?,
        };
        let example = Example { input_ids, labels };
        return Ok(Built {
            example,
            shown: None,
        });
    }
    let tok = conv.tokenizer.as_ref().expect("checked by fatal");
    match format {
        Format::Pretokenized => unreachable!("handled above"),
        Format::Text => targets::text(&rec, tok, rec.nonempty_string("text")?, explain),
        Format::PromptCompletion => {
            let texts = (rec.string("prompt")?, rec.nonempty_string("completion")?);
            let fields = ("prompt", "completion");
            targets::prompt_completion(&rec, tok, texts, fields, all, explain)
        }
        Format::Messages | Format::ShareGpt => {
            let shape = if format == Format::Messages {
                &MESSAGES
            } else {
                &SHAREGPT
            };
            let messages = conversation(&rec, shape)?;
            targets::chat(&rec, tok, &messages, shape.field, all, explain)
        }
        Format::Alpaca => {
            let instruction = rec.nonempty_string("instruction")?;
            let input = rec.opt_string("input")?;
            let output = rec.nonempty_string("output")?;
            let user = if input.is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n{input}")
            };
            if tok.has_chat_template() {
                let messages = [
                    serde_json::json!({"role": "user", "content": user}),
                    serde_json::json!({"role": "assistant", "content": output}),
                ];
                targets::chat(&rec, tok, &messages, "instruction", all, explain)
            } else {
                let prompt = format!("{user}\n");
                let fields = ("instruction", "output");
                targets::prompt_completion(&rec, tok, (&prompt, output), fields, all, explain)
            }
        }
    }
}

/// One record with its location, for field access with located errors.
pub(crate) struct Record<'r> {
    pub path: &'r Path,
    pub line: usize,
    pub obj: &'r Map<String, Value>,
}

impl Record<'_> {
    pub(crate) fn err(&self, field: &str, msg: impl Into<String>) -> DataError {
        DataError::at(self.path, self.line, Some(field), msg)
    }

    pub(crate) fn get(&self, field: &str) -> Result<&Value, DataError> {
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

    /// A required, non-empty string.
    pub(crate) fn nonempty_string(&self, field: &str) -> Result<&str, DataError> {
        let s = self.string(field)?;
        if s.is_empty() {
            return Err(self.err(field, "empty string"));
        }
        Ok(s)
    }

    /// An optional string (missing or null gives "").
    pub(crate) fn opt_string(&self, field: &str) -> Result<&str, DataError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(""),
            Some(_) => self.string(field),
        }
    }
}
