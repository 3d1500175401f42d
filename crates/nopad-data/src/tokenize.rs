//! The model's tokenizer and chat template: `tokenizer.json` through the `tokenizers` crate,
//! special tokens and BOS/EOS rules from `tokenizer_config.json`, and the Jinja chat template
//! rendered with minijinja the way HF's `apply_chat_template` renders it.
//!
//! Owns: how text becomes ids (never adding special tokens behind the caller's back; BOS is added
//! explicitly, once), and where each assistant turn lies in a rendered conversation. It does not
//! decide what is trained for plain formats; `records.rs` does.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::DataError;

/// A model's tokenizer with its special-token rules and (optional) chat template.
pub struct ModelTokenizer {
    tok: Tokenizer,
    dir: PathBuf,
    bos: Option<(String, i32)>,
    eos: Option<(String, i32)>,
    add_bos: bool,
    template: Option<Environment<'static>>,
    /// Where the chat template came from, for messages.
    template_origin: String,
    vocab_size: usize,
}

/// Instructions one rendering of a chat template may execute. A real template spends a few
/// hundred per message; this stops a template that loops without end in well under a second.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// Bytes one rendering may write, macro and block captures included: 64 MiB, far beyond any
/// conversation that fits a training example, so a template that doubles its output fails here
/// instead of aborting on an allocation.
const TEMPLATE_OUTPUT_BYTES: usize = 64 << 20;

/// Bytes written so far in one rendering (a per-render temp object of minijinja's state).
#[derive(Debug, Default)]
struct Written(AtomicUsize);

impl minijinja::value::Object for Written {}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("dir", &self.dir)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.template.is_some())
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": "..."}`.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template: a string, or a list of `{name, template}` (the one named "default", else
/// the first). `None` when the key is absent or null; any other shape is an error saying what
/// was found, so that a malformed template is not mistaken for a missing one.
fn chat_template(cfg: &Value, path: &Path) -> Result<Option<String>, DataError> {
    let wrong = |what: String| DataError::file(path, format!("field `chat_template`: {what}"));
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
            };
            let entry = named("default")
                .or(list.first())
                .ok_or_else(|| wrong("an empty list of templates".into()))?;
            match entry.get("template") {
                Some(Value::String(t)) => Ok(Some(t.clone())),
                _ => Err(wrong(format!(
                    "the list entry {entry} has no `template` string"
                ))),
            }
        }
        Some(v) => Err(wrong(format!(
            "expected a string or a list of {{name, template}}, found {}",
            crate::error::json_kind(v)
        ))),
    }
}

/// The environment a chat template renders in: HF's settings, a fuel and an output budget, and
/// no loader (so `include`, `import` and `extends` find no template but this one).
fn template_env(src: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // HF renders with trim_blocks and lstrip_blocks on, and Python string methods.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<(), minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_formatter(move |out, state, value| {
        let written = state.get_or_set_temp_object("nopad.written", Written::default);
        let len = value
            .as_str()
            .map_or_else(|| value.to_string().len(), str::len);
        let total = written.0.fetch_add(len, Ordering::Relaxed) + len;
        if total > TEMPLATE_OUTPUT_BYTES {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("the output exceeds the budget of {TEMPLATE_OUTPUT_BYTES} bytes"),
            ));
        }
        minijinja::escape_formatter(out, state, value)
    });
    env.add_template_owned("chat", src)?;
    Ok(env)
}

impl ModelTokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` (and a
    /// `chat_template.jinja` beside them, which newer models ship separately).
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let tok_path = dir.join("tokenizer.json");
        let tok = Tokenizer::from_file(&tok_path)
            .map_err(|e| DataError::file(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                DataError::at(&cfg_path, e.line(), None, format!("malformed JSON: {e}"))
            })?,
            Err(_) => Value::Null,
        };
        let id_of = |name: String, key: &str| -> Result<(String, i32), DataError> {
            let id = tok.token_to_id(&name).ok_or_else(|| {
                DataError::file(
                    &cfg_path,
                    format!("field `{key}`: token {name:?} is not in tokenizer.json"),
                )
            })?;
            Ok((name, id as i32))
        };
        let bos = special_token(&cfg, "bos_token")
            .map(|n| id_of(n, "bos_token"))
            .transpose()?;
        let eos = special_token(&cfg, "eos_token")
            .map(|n| id_of(n, "eos_token"))
            .transpose()?;
        // `add_bos_token` decides when present; otherwise whatever the post-processor adds (Llama
        // 3 ships no flag but a TemplateProcessing that prepends BOS).
        let add_bos = match (cfg.get("add_bos_token").and_then(Value::as_bool), &bos) {
            (Some(flag), Some(_)) => flag,
            (None, Some((_, id))) => {
                let with = tok.encode("a", true).map(|e| e.get_ids().first().copied());
                matches!(with, Ok(Some(first)) if first as i32 == *id)
            }
            (_, None) => false,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (template_src, template_origin, from_config) = match chat_template(&cfg, &cfg_path)? {
            Some(src) => (
                Some(src),
                format!("{} field `chat_template`", cfg_path.display()),
                true,
            ),
            None => (
                std::fs::read_to_string(&jinja_path).ok(),
                jinja_path.display().to_string(),
                false,
            ),
        };
        let template = template_src
            .map(|src| {
                template_env(src).map_err(|e| {
                    if from_config {
                        let msg = format!("field `chat_template`: does not parse: {e}");
                        DataError::file(&cfg_path, msg)
                    } else {
                        DataError::file(&jinja_path, format!("does not parse: {e}"))
                    }
                })
            })
            .transpose()?;
        let vocab_size = tok.get_vocab_size(true);
        Ok(ModelTokenizer {
            tok,
            dir: dir.to_path_buf(),
            bos,
            eos,
            add_bos,
            template,
            template_origin,
            vocab_size,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<i32> {
        self.bos.as_ref().map(|b| b.1)
    }
    /// The EOS id, if the model has one.
    pub fn eos_id(&self) -> Option<i32> {
        self.eos.as_ref().map(|e| e.1)
    }
    /// Whether sequences start with BOS (per `add_bos_token` or the post-processor).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }
    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Ids of `text` without any special token added (special tokens written in the text are
    /// still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<i32>, String> {
        let enc = self
            .tok
            .encode_fast(text, false)
            .map_err(|e| e.to_string())?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }

    /// Ids of `text` with the byte offset where each token starts.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<i32>, Vec<usize>), String> {
        let enc = self.tok.encode(text, false).map_err(|e| e.to_string())?;
        let ids = enc.get_ids().iter().map(|&i| i as i32).collect();
        Ok((ids, enc.get_offsets().iter().map(|o| o.0).collect()))
    }

    /// Renders `messages` (JSON objects with at least `role` and `content`) with the chat
    /// template, as HF's `apply_chat_template(tokenize=False)` does.
    pub fn render_chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let env = self
            .template
            .as_ref()
            .ok_or("the tokenizer has no chat template")?;
        let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
        let name = |t: &Option<(String, i32)>| t.as_ref().map(|t| t.0.clone()).unwrap_or_default();
        tmpl.render(context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => name(&self.bos),
            eos_token => name(&self.eos),
            tools => (),
            documents => (),
        })
        .map_err(|e| {
            let mut msg = if e.kind() == ErrorKind::OutOfFuel {
                format!("ran out of fuel after {TEMPLATE_FUEL} steps (does it loop without end?)")
            } else {
                e.to_string()
            };
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            format!("{msg}; the template is {}", self.template_origin)
        })
    }

    /// Renders a conversation and returns the text with the byte spans each assistant turn
    /// occupies: its content and whatever the template writes after it before the next turn
    /// (the end-of-turn tokens). Found by rendering growing prefixes of the conversation: turn i
    /// spans from the end of `messages[..i]` with the generation prompt to the end of
    /// `messages[..=i]`, starting at the content itself when the template writes the role header
    /// there (templates without a generation prompt).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Value],
    ) -> Result<(String, Vec<(usize, usize)>), String> {
        let full = self.render_chat(messages, false)?;
        let mut spans = vec![];
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render_chat(&messages[..i], true)?;
            let upto = self.render_chat(&messages[..=i], false)?;
            let content = m.get("content").and_then(Value::as_str).unwrap_or("");
            if upto.starts_with(&before) && full.starts_with(&upto) {
                // A template that ignores `add_generation_prompt` leaves the role header inside
                // the new text: the trained span starts where the content does.
                let skip = Some(content)
                    .filter(|c| !c.is_empty())
                    .and_then(|c| upto[before.len()..].find(c))
                    .unwrap_or(0);
                spans.push((before.len() + skip, upto.len()));
                continue;
            }
            // Templates that rewrite earlier turns (e.g. drop reasoning) break the prefix rule:
            // find this turn's content, and the end-of-turn text after it, in the full render.
            let from = spans.last().map_or(0, |s: &(usize, usize)| s.1);
            let tail = upto
                .rfind(content)
                .map(|p| &upto[p + content.len()..])
                .filter(|_| !content.is_empty());
            match (tail, full[from..].find(content)) {
                (Some(tail), Some(p)) if full[from + p + content.len()..].starts_with(tail) => {
                    let start = from + p;
                    spans.push((start, start + content.len() + tail.len()));
                }
                _ => {
                    return Err(format!(
                        "cannot locate assistant message {i} in the rendered conversation \
                         (the template rewrites it)"
                    ))
                }
            }
        }
        Ok((full, spans))
    }
}
