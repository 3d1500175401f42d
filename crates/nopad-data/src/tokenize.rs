//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, special tokens and
//! BOS/EOS rules from `tokenizer_config.json`, and the chat template (`template.rs`) found beside
//! them or given by the user.
//!
//! Owns how text becomes ids (never adding special tokens behind the caller's back; BOS is added
//! explicitly, once) and where each token lies in the text. It does not decide what is trained;
//! `records.rs` and `targets.rs` do.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{PostProcessorWrapper, Tokenizer};

use crate::error::DataError;
use crate::template::{config_template, ChatTemplate, Source};

/// A model's tokenizer with its special-token rules and (optional) chat template.
pub struct ModelTokenizer {
    /// The tokenizer without its post-processor: it would add no token to what we encode (BOS is
    /// ours to add), and a ByteLevel post-processor with `trim_offsets` would move a token's
    /// leading space out of its span, and so a token across a prompt's end to the wrong side.
    tok: Tokenizer,
    dir: PathBuf,
    bos: Option<(String, i32)>,
    eos: Option<(String, i32)>,
    add_bos: bool,
    template: Option<ChatTemplate>,
    vocab_size: usize,
}

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

/// Ids of a text and the byte span of the text each comes from.
pub(crate) struct Encoded {
    pub ids: Vec<i32>,
    /// `(start, end)` byte offsets into the encoded text, one per id.
    pub spans: Vec<(usize, usize)>,
}

impl ModelTokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` (and a
    /// `chat_template.jinja` beside them, which newer models ship separately).
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        Self::load_with_template(dir, None)
    }

    /// [`ModelTokenizer::load`], with the chat template read from `template` instead of the
    /// model's own when given (HF's `tokenizer.chat_template = ...`).
    pub fn load_with_template(dir: &Path, template: Option<&Path>) -> Result<Self, DataError> {
        let tok_path = dir.join("tokenizer.json");
        let mut tok = Tokenizer::from_file(&tok_path)
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
        tok.with_post_processor(None::<PostProcessorWrapper>);
        let name = |t: &Option<(String, i32)>| t.as_ref().map(|t| t.0.clone()).unwrap_or_default();
        let parse = |src, from| ChatTemplate::parse(src, from, name(&bos), name(&eos));
        let jinja_path = dir.join("chat_template.jinja");
        let template = match (template, config_template(&cfg, &cfg_path)?) {
            (Some(file), _) => {
                let src = std::fs::read_to_string(file).map_err(|e| {
                    DataError::file(file, format!("cannot read the chat template: {e}"))
                })?;
                Some(parse(src, Source::File(file))?)
            }
            (None, Some(src)) => Some(parse(src, Source::ConfigField(&cfg_path))?),
            (None, None) => match std::fs::read_to_string(&jinja_path) {
                Ok(src) => Some(parse(src, Source::File(&jinja_path))?),
                Err(_) => None,
            },
        };
        let vocab_size = tok.get_vocab_size(true);
        Ok(ModelTokenizer {
            tok,
            dir: dir.to_path_buf(),
            bos,
            eos,
            add_bos,
            template,
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
    /// The token an id stands for (`None` for an id outside the vocabulary).
    pub fn token(&self, id: i32) -> Option<String> {
        u32::try_from(id).ok().and_then(|i| self.tok.id_to_token(i))
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

    /// The text of `ids` as HF's `tokenizer.decode(ids, skip_special_tokens=True)` gives it
    /// (generated completions).
    pub fn decode(&self, ids: &[i32]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i.max(0) as u32).collect();
        self.tok.decode(&ids, true).map_err(|e| e.to_string())
    }

    /// [`ModelTokenizer::encode`], with the byte span of `text` each token comes from.
    pub(crate) fn encode_with_spans(&self, text: &str) -> Result<Encoded, String> {
        let enc = self.tok.encode(text, false).map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().iter().map(|&i| i as i32).collect(),
            spans: enc.get_offsets().to_vec(),
        })
    }

    /// The chat template, or why there is none.
    pub(crate) fn template(&self) -> Result<&ChatTemplate, String> {
        self.template
            .as_ref()
            .ok_or_else(|| "the tokenizer has no chat template".to_string())
    }

    /// Renders `messages` (JSON objects with at least `role` and `content`) with the chat
    /// template, as HF's `apply_chat_template(tokenize=False)` does.
    pub fn render_chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.template()?.render(messages, add_generation_prompt)
    }
}
