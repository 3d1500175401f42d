//! Prompts for generation and the samples a training run writes (`--sample-every`): what a
//! prompt may be (raw text, a conversation, ids), how it becomes ids as Hugging Face makes them
//! (`tokenizer(text)` with its BOS rule; `apply_chat_template(messages,
//! add_generation_prompt=True)`), a prompts file (`{"prompt": ...}`, `{"messages": [...]}` or
//! `{"prompt_ids": [...]}` per line, each error naming the file, line and field), and the
//! sampler of a run: greedy completions of its prompts from the current weights, written to the
//! log as `{"step": s, "samples": [{"prompt", "completion", "ids", "stop"}]}` and to stderr.
//! `nopad generate` reads its prompts through the same functions.

use std::path::{Path, PathBuf};

use nopad_backend::Backend;
use nopad_data::ModelTokenizer;
use nopad_model::generate::{GenerateOptions, Generated, Sampling};
use nopad_model::{Config, Model};
use serde::Serialize;
use serde_json::Value;

use crate::config::{ModelSource, TrainConfig};
use crate::error::{Result, TrainError};

/// `--sample-every N --sample-prompts FILE [--sample-max-new-tokens M]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// Sample after every this many optimizer steps (and after the last).
    pub every: u64,
    /// The prompts file (JSON lines, see [`read_prompts`]).
    pub prompts: PathBuf,
    /// Tokens generated per prompt at most.
    pub max_new_tokens: usize,
}

impl SampleConfig {
    /// Checks the numbers; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::Config(m.into()));
        match (self.every, self.max_new_tokens) {
            (0, _) => bad("`sample-every`: must be at least 1"),
            (_, 0) => bad("`sample-max-new-tokens`: must be at least 1"),
            _ => Ok(()),
        }
    }
}

/// What one prompt is.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Raw text, tokenised as HF's `tokenizer(text)` does (BOS by the tokenizer's rule).
    Text(String),
    /// A conversation (`role`/`content` objects), rendered with the chat template and its
    /// generation prompt.
    Messages(Vec<Value>),
    /// Ids as they are (models without tokenizer files, parity tests).
    Ids(Vec<i32>),
}

impl PromptInput {
    /// The prompt of a JSON record: exactly one of `prompt` (a string), `messages` (a list of
    /// objects with `role` and `content`) and `prompt_ids` (a list of token ids).
    pub fn from_record(v: &Value) -> std::result::Result<Self, String> {
        let Some(obj) = v.as_object() else {
            return Err("expected a JSON object with `prompt`, `messages` or `prompt_ids`".into());
        };
        let fields: Vec<&str> = ["prompt", "messages", "prompt_ids"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        match fields.as_slice() {
            ["prompt"] => match &obj["prompt"] {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                other => Err(format!("field `prompt`: expected a string, found {other}")),
            },
            ["messages"] => Self::messages(&obj["messages"]),
            ["prompt_ids"] => Self::ids(&obj["prompt_ids"]),
            [] => Err("no `prompt`, `messages` or `prompt_ids` field".into()),
            many => Err(format!(
                "fields {}: give one prompt per record",
                many.join(", ")
            )),
        }
    }

    /// A conversation: a non-empty list of objects, each with a string `role` and `content`.
    pub fn messages(v: &Value) -> std::result::Result<Self, String> {
        let list = v.as_array().filter(|l| !l.is_empty()).ok_or_else(|| {
            format!("field `messages`: expected a non-empty list of messages, found {v}")
        })?;
        for (i, m) in list.iter().enumerate() {
            let has = |k: &str| m.get(k).is_some_and(Value::is_string);
            if !(has("role") && has("content")) {
                return Err(format!(
                    "field `messages`: message {i} needs a string `role` and `content`, found {m}"
                ));
            }
        }
        Ok(PromptInput::Messages(list.clone()))
    }

    /// Ids: a non-empty list of non-negative integers.
    pub fn ids(v: &Value) -> std::result::Result<Self, String> {
        let ids: Option<Vec<i32>> = v.as_array().filter(|l| !l.is_empty()).and_then(|l| {
            l.iter()
                .map(|x| x.as_u64().and_then(|x| i32::try_from(x).ok()))
                .collect()
        });
        ids.map(PromptInput::Ids).ok_or_else(|| {
            format!("field `prompt_ids`: expected a non-empty list of token ids, found {v}")
        })
    }

    /// The field the prompt came from (for errors).
    fn field(&self) -> &'static str {
        match self {
            PromptInput::Text(_) => "prompt",
            PromptInput::Messages(_) => "messages",
            PromptInput::Ids(_) => "prompt_ids",
        }
    }

    /// The prompt as JSON, as given (what sample records and `nopad generate --json` echo).
    pub fn given(&self) -> Value {
        match self {
            PromptInput::Text(s) => Value::String(s.clone()),
            PromptInput::Messages(m) => Value::Array(m.clone()),
            PromptInput::Ids(ids) => Value::from(ids.clone()),
        }
    }

    /// The prompt's ids under `tok` (needed for text and conversations), each below `vocab`.
    pub fn to_ids(
        &self,
        tok: Option<&ModelTokenizer>,
        vocab: usize,
    ) -> std::result::Result<Vec<i32>, String> {
        let need = || {
            tok.ok_or_else(|| {
                format!(
                    "field `{}`: the model has no tokenizer.json to tokenise it; give `prompt_ids`",
                    self.field()
                )
            })
        };
        let ids = match self {
            PromptInput::Ids(ids) => ids.clone(),
            PromptInput::Text(text) => {
                let tok = need()?;
                let mut ids: Vec<i32> = tok
                    .bos_id()
                    .filter(|_| tok.adds_bos())
                    .into_iter()
                    .collect();
                ids.extend(
                    tok.encode(text)
                        .map_err(|e| format!("field `prompt`: {e}"))?,
                );
                ids
            }
            PromptInput::Messages(m) => {
                let tok = need()?;
                let text = tok
                    .render_chat(m, true)
                    .map_err(|e| format!("field `messages`: {e}"))?;
                tok.encode(&text)
                    .map_err(|e| format!("field `messages`: {e}"))?
            }
        };
        if ids.is_empty() {
            return Err(format!("field `{}`: the prompt has no token", self.field()));
        }
        match ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            Some(t) => Err(format!(
                "field `{}`: token id {t} is outside the model's vocabulary of {vocab}",
                self.field()
            )),
            None => Ok(ids),
        }
    }
}

/// One prompt: as given, and its ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// As given (a string, a list of messages or a list of ids).
    pub given: Value,
    /// Its ids.
    pub ids: Vec<i32>,
}

/// The prompts of a JSON-lines file, one record per line ([`PromptInput::from_record`]; blank
/// lines skipped); an error names the file and line.
pub fn read_prompts(
    path: &Path,
    tok: Option<&ModelTokenizer>,
    vocab: usize,
) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io(path))?;
    let at = |line: usize, msg: String| {
        TrainError::Config(format!("{}:{}: {msg}", path.display(), line + 1))
    };
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(i, format!("malformed JSON: {e}")))?;
        let input = PromptInput::from_record(&v).map_err(|e| at(i, e))?;
        let ids = input.to_ids(tok, vocab).map_err(|e| at(i, e))?;
        prompts.push(Prompt {
            given: input.given(),
            ids,
        });
    }
    if prompts.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no prompt in the file",
            path.display()
        )));
    }
    Ok(prompts)
}

/// The tokenizer of a model directory with `tokenizer.json` (its chat template replaced by
/// `template` when given); None for presets and directories without one.
pub fn model_tokenizer(
    dir: Option<&Path>,
    template: Option<&Path>,
) -> Result<Option<ModelTokenizer>> {
    match dir.filter(|d| d.join("tokenizer.json").is_file()) {
        Some(d) => Ok(Some(ModelTokenizer::load_with_template(d, template)?)),
        None => Ok(None),
    }
}

/// The text of generated ids (None without a tokenizer).
pub fn completion_text(tok: Option<&ModelTokenizer>, ids: &[i32]) -> Result<Option<String>> {
    tok.map(|t| t.decode(ids))
        .transpose()
        .map_err(|e| TrainError::Config(format!("decoding a completion: {e}")))
}

/// One sample: the prompt as given, the completion's text (None without a tokenizer), its ids
/// and why it ended.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The prompt as given.
    pub prompt: Value,
    /// The completion's text.
    pub completion: Option<String>,
    /// The completion's ids.
    pub ids: Vec<i32>,
    /// `eos` or `length`.
    pub stop: &'static str,
}

/// The samples after one step (a line of the JSON log).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SampleRecord {
    pub step: u64,
    pub samples: Vec<Sample>,
}

/// A run's sampler: its prompts, tokenizer and settings (every rank's; rank 0 writes).
pub(crate) struct Sampler {
    prompts: Vec<Prompt>,
    tok: Option<ModelTokenizer>,
    opts: GenerateOptions,
    every: u64,
}

impl Sampler {
    /// The sampler of `tc` for a model of `cfg` (None when the run takes no samples): the
    /// prompts read and tokenised now, so a bad file stops the run before step 1.
    pub(crate) fn open(tc: &TrainConfig, cfg: &Config) -> Result<Option<Self>> {
        let Some(sc) = &tc.sample else {
            return Ok(None);
        };
        let dir = match &tc.model {
            ModelSource::Dir(d) => Some(d.as_path()),
            ModelSource::Preset(_) => None,
        };
        let tok = model_tokenizer(dir, tc.chat_template.as_deref())?;
        let prompts = read_prompts(&sc.prompts, tok.as_ref(), cfg.vocab_size)?;
        let eos = nopad_model::generate::eos_ids(cfg, dir)?;
        Ok(Some(Sampler {
            prompts,
            tok,
            opts: GenerateOptions {
                max_new_tokens: sc.max_new_tokens,
                sampling: Sampling::GREEDY,
                seed: 0,
                eos,
            },
            every: sc.every,
        }))
    }

    /// The prompts' lengths in tokens (what the memory plan sizes the cache from).
    pub(crate) fn lens(&self) -> Vec<usize> {
        self.prompts.iter().map(|p| p.ids.len()).collect()
    }

    /// Tokens generated per prompt at most.
    pub(crate) fn max_new_tokens(&self) -> usize {
        self.opts.max_new_tokens
    }

    /// Whether samples are due after `step` of a run of `total`.
    pub(crate) fn due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.every) || step == total
    }

    /// Greedy completions of every prompt from `model`'s current weights.
    pub(crate) fn run<B: Backend>(
        &self,
        b: &B,
        model: &mut Model<B>,
        step: u64,
    ) -> Result<SampleRecord> {
        let ids: Vec<Vec<i32>> = self.prompts.iter().map(|p| p.ids.clone()).collect();
        let out = model.generate(b, &ids, &self.opts)?;
        let samples = self
            .prompts
            .iter()
            .zip(out)
            .map(|(p, Generated { ids, stop, .. })| {
                Ok(Sample {
                    prompt: p.given.clone(),
                    completion: completion_text(self.tok.as_ref(), &ids)?,
                    ids,
                    stop: stop.name(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(SampleRecord { step, samples })
    }
}

impl SampleRecord {
    /// The samples as stderr lines: `step S sample I: <completion or ids>`.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let text = match &s.completion {
                    Some(t) => format!("{t:?}"),
                    None => format!("ids {:?}", s.ids),
                };
                format!("step {} sample {i}: {text}", self.step)
            })
            .collect()
    }
}
