//! Records: the record [`Format`]s (and their detection from a record's keys), and turning one
//! parsed JSON record into an [`Example`] per format.
//!
//! Owns the field-level checks (missing field, wrong type) so that every message names the line
//! and the field. Formats made of text hand their strings to the model tokenizer in
//! `tokenize.rs`; this module decides which text is a target and which is not.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{json_kind, DataError};
use crate::messages::{conversation, MESSAGES, SHAREGPT};
use crate::tokenize::ModelTokenizer;
use crate::{Example, IGNORE_INDEX};

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
}

impl<'a> Converter<'a> {
    /// `format` forces the format (`None`: detect it from the first record); token ids are
    /// checked against `vocab_size`, else the tokenizer's vocabulary if `tokenizer_dir` has one;
    /// `loss_on` picks the targets (`None`: the format's default).
    pub(crate) fn new(
        path: &'a Path,
        format: Option<Format>,
        vocab_size: Option<usize>,
        tokenizer_dir: Option<&Path>,
        loss_on: Option<LossOn>,
    ) -> Result<Self, DataError> {
        // A model directory without tokenizer.json is fine for pretokenized data; formats that
        // need a tokenizer then fail with `missing_tokenizer`.
        let tokenizer = tokenizer_dir
            .filter(|d| d.join("tokenizer.json").exists())
            .map(ModelTokenizer::load)
            .transpose()?;
        Ok(Converter {
            path,
            format,
            vocab_size: vocab_size.or(tokenizer.as_ref().map(ModelTokenizer::vocab_size)),
            tokenizer,
            tokenizer_dir: tokenizer_dir.map(Path::to_path_buf),
            loss_on,
        })
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
) -> Result<Example, DataError> {
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
pub(crate) fn convert_known(
    conv: &Converter,
    line: usize,
    raw: &str,
) -> Result<Example, DataError> {
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
) -> Result<Example, DataError> {
    let path = conv.path;
    let format = conv.format.expect("the format is known before conversion");
    let rec = Record { path, line, obj };
    if let Some(e) = conv.fatal() {
        return Err(e);
    }
    if format == Format::Pretokenized {
        let input_ids = rec.int_array("input_ids")?;
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => input_ids.clone(),
            // `--loss-on all` trains every token whatever the labels say.
            Some(_) if conv.trains_all() => input_ids.clone(),
            Some(_) => rec.int_array("labels")?,
        };
        return Ok(Example { input_ids, labels });
    }
    let tok = conv.tokenizer.as_ref().expect("checked by fatal");
    match format {
        Format::Pretokenized => unreachable!("handled above"),
        Format::Text => {
            let text = rec.nonempty_string("text")?;
            let body = rec.encode(tok, "text", text)?;
            let mut ids = bos_unless(tok, &body);
            ids.extend(body);
            push_eos_unless_there(&mut ids, tok.eos_id());
            Ok(every_token(tok, ids))
        }
        Format::PromptCompletion => {
            let prompt = rec.string("prompt")?;
            let completion = rec.nonempty_string("completion")?;
            prompt_completion(
                &rec,
                conv,
                tok,
                prompt,
                completion,
                ("prompt", "completion"),
            )
        }
        Format::Messages | Format::ShareGpt => {
            let shape = if format == Format::Messages {
                &MESSAGES
            } else {
                &SHAREGPT
            };
            let messages = conversation(&rec, shape)?;
            chat(&rec, conv, tok, &messages, shape.field)
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
                chat(&rec, conv, tok, &messages, "instruction")
            } else {
                let prompt = format!("{user}\n");
                let fields = ("instruction", "output");
                prompt_completion(&rec, conv, tok, &prompt, output, fields)
            }
        }
    }
}

/// `[BOS]` when the tokenizer's rules add one and the text does not already start with it.
fn bos_unless(tok: &ModelTokenizer, text_ids: &[i32]) -> Vec<i32> {
    match tok.bos_id() {
        Some(id) if tok.adds_bos() && text_ids.first() != Some(&id) => vec![id],
        _ => vec![],
    }
}

/// Ends with EOS (a target: the model learns to stop), unless the text already wrote it.
fn push_eos_unless_there(ids: &mut Vec<i32>, eos: Option<i32>) {
    if let Some(eos) = eos {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
}

/// Every token a target but a leading BOS (which nothing predicts).
fn every_token(tok: &ModelTokenizer, ids: Vec<i32>) -> Example {
    let mut labels = ids.clone();
    if tok.bos_id().is_some() && ids.first() == tok.bos_id().as_ref() {
        labels[0] = IGNORE_INDEX;
    }
    Example {
        input_ids: ids,
        labels,
    }
}

/// `[BOS] prompt completion EOS`, loss on the completion and EOS (on every token under
/// `--loss-on all`). The two texts are tokenized apart so the boundary between them is exact.
fn prompt_completion(
    rec: &Record,
    conv: &Converter,
    tok: &ModelTokenizer,
    prompt: &str,
    completion: &str,
    fields: (&str, &str),
) -> Result<Example, DataError> {
    let eos = tok.eos_id().ok_or_else(|| {
        rec.err(
            fields.1,
            "the tokenizer names no eos_token (tokenizer_config.json), so the completion \
             cannot be ended",
        )
    })?;
    let prompt_ids = rec.encode(tok, fields.0, prompt)?;
    let mut ids = bos_unless(tok, &prompt_ids);
    ids.extend(prompt_ids);
    let n_prompt = ids.len();
    ids.extend(rec.encode(tok, fields.1, completion)?);
    push_eos_unless_there(&mut ids, Some(eos));
    if conv.trains_all() {
        return Ok(every_token(tok, ids));
    }
    let mut labels = ids.clone();
    labels[..n_prompt].fill(IGNORE_INDEX);
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// A conversation through the chat template; loss on each assistant turn's span only (on every
/// token under `--loss-on all`).
fn chat(
    rec: &Record,
    conv: &Converter,
    tok: &ModelTokenizer,
    messages: &[Value],
    field: &str,
) -> Result<Example, DataError> {
    if messages.is_empty() {
        return Err(rec.err(field, "empty conversation"));
    }
    let failed = |e: String| rec.err(field, format!("chat template failed to render: {e}"));
    // A conversation with no assistant turn renders with every label masked: the loader skips
    // and counts it with the other examples that have no target (or refuses it under strict).
    let (text, spans) = if conv.trains_all() {
        let text = tok.render_chat(messages, false).map_err(failed)?;
        let whole = vec![(0, text.len())];
        (text, whole)
    } else {
        tok.render_with_assistant_spans(messages).map_err(failed)?
    };
    let (mut ids, starts) = tok
        .encode_with_offsets(&text)
        .map_err(|e| rec.err(field, format!("cannot tokenize the rendered text: {e}")))?;
    let mut labels: Vec<i32> = ids
        .iter()
        .zip(&starts)
        .map(|(&id, &at)| {
            let trained = spans.iter().any(|&(s, e)| at >= s && at < e);
            if trained {
                id
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    // BOS per tokenizer_config.json, but never a second one when the template wrote it.
    if let (Some(b), true) = (tok.bos_id(), tok.adds_bos()) {
        if ids.first() != Some(&b) {
            ids.insert(0, b);
            labels.insert(0, IGNORE_INDEX);
        }
    }
    if conv.trains_all() {
        // The template's own BOS is no target either.
        return Ok(every_token(tok, ids));
    }
    Ok(Example {
        input_ids: ids,
        labels,
    })
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

    /// The ids of `text`, or an error naming the field it came from.
    fn encode(&self, tok: &ModelTokenizer, field: &str, text: &str) -> Result<Vec<i32>, DataError> {
        tok.encode(text)
            .map_err(|e| self.err(field, format!("cannot tokenize: {e}")))
    }

    /// An optional string (missing or null gives "").
    pub(crate) fn opt_string(&self, field: &str) -> Result<&str, DataError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(""),
            Some(_) => self.string(field),
        }
    }
}
