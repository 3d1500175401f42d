//! Chat templates: where a model's template comes from (`tokenizer_config.json`, a
//! `chat_template.jinja` beside it, or a file the user names with `--chat-template`), the Jinja
//! environment it renders in (HF's settings, a fuel and an output budget, no loader), and where
//! each assistant turn lies in a rendered conversation.
//!
//! Owns the renderings HF's `apply_chat_template(tokenize=False)` gives, and the byte spans TRL's
//! `assistant_only_loss` trains: each assistant message's content and the end-of-turn text the
//! template writes after it, never a role header and never the header a Llama 3.0-style
//! template appends after every conversation. Turning spans into labels is `records.rs`' job.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;

use crate::error::DataError;

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

/// A parsed chat template with what it renders with: the names of the special tokens, where it
/// came from (for messages), and the text it appends after any conversation.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from: a file, or a config file's field.
    origin: String,
    bos: String,
    eos: String,
    /// What an empty conversation renders to when the template ignores `add_generation_prompt`
    /// (else empty): the text it writes after every conversation, such as the assistant header
    /// Llama 3.0's template always appends, plus whatever it writes before the first message.
    trailer_candidate: String,
}

/// The chat template of `tokenizer_config.json`: a string, or a list of `{name, template}` (the
/// one named "default", else the first). `None` when the key is absent or null; any other shape
/// is an error saying what was found, so that a malformed template is not mistaken for a missing
/// one.
pub(crate) fn config_template(cfg: &Value, path: &Path) -> Result<Option<String>, DataError> {
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

/// Where a template's source comes from, for its parse errors.
pub(crate) enum Source<'a> {
    /// A field of a JSON config file (`tokenizer_config.json`'s `chat_template`).
    ConfigField(&'a Path),
    /// A Jinja file of its own (`chat_template.jinja`, or `--chat-template FILE`).
    File(&'a Path),
}

impl ChatTemplate {
    /// Parses `src`; an error names the file (and, for a template file, the line minijinja
    /// reports). `bos` and `eos` are the special tokens' names the template may write.
    pub(crate) fn parse(
        src: String,
        from: Source,
        bos: String,
        eos: String,
    ) -> Result<Self, DataError> {
        let origin = match from {
            Source::ConfigField(p) => format!("{} field `chat_template`", p.display()),
            Source::File(p) => p.display().to_string(),
        };
        let env = template_env(src).map_err(|e| {
            let what = match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.kind().to_string(),
            };
            match (from, e.line()) {
                (Source::ConfigField(p), line) => {
                    let at = line.map_or(String::new(), |l| format!(" (template line {l})"));
                    DataError::file(
                        p,
                        format!("field `chat_template`: does not parse: {what}{at}"),
                    )
                }
                (Source::File(p), Some(line)) => DataError::at(
                    p,
                    line,
                    None,
                    format!("the chat template does not parse: {what}"),
                ),
                (Source::File(p), None) => {
                    DataError::file(p, format!("the chat template does not parse: {what}"))
                }
            }
        })?;
        let mut t = ChatTemplate {
            env,
            origin,
            bos,
            eos,
            trailer_candidate: String::new(),
        };
        // A template that fails on an empty conversation has no trailer we can measure; one
        // whose output changes with `add_generation_prompt` writes its header only on request.
        if let (Ok(plain), Ok(prompted)) = (t.render(&[], false), t.render(&[], true)) {
            if plain == prompted {
                t.trailer_candidate = plain;
            }
        }
        Ok(t)
    }

    /// Renders `messages` (JSON objects with at least `role` and `content`) as HF's
    /// `apply_chat_template(tokenize=False)` does.
    pub(crate) fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
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
            format!("{msg}; the template is {}", self.origin)
        })
    }

    /// The text `full` (a rendered conversation) ends with that the template writes after every
    /// conversation whatever `add_generation_prompt` says: the part of the empty conversation's
    /// rendering `full` ends with (a byte or two of an end-of-turn token may join it when that
    /// rendering starts with a BOS; labels go by where a token starts, so such a token stays
    /// in the turn). Empty for templates that write a header only on request.
    fn trailer<'f>(&self, full: &'f str) -> &'f str {
        // What an empty conversation renders to and a conversation starts with is written before
        // the messages (a BOS, a default system prompt), not after them.
        if full.starts_with(&self.trailer_candidate) {
            return "";
        }
        let common = full
            .bytes()
            .rev()
            .zip(self.trailer_candidate.bytes().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let mut start = full.len() - common;
        while !full.is_char_boundary(start) {
            start += 1;
        }
        &full[start..]
    }

    /// Renders a conversation and returns the text with the byte spans each assistant turn
    /// occupies: its content and whatever the template writes after it before the next turn
    /// (the end-of-turn tokens). Found by rendering growing prefixes of the conversation: turn i
    /// spans from the end of `messages[..i]` with the generation prompt to the end of
    /// `messages[..=i]`, starting at the content itself when the template writes the role header
    /// there (templates without a generation prompt). A template that appends the assistant
    /// header after every conversation (Llama 3.0) ends each prefix with it: that trailer is
    /// left out of the turn, and is no target after the last message either.
    pub(crate) fn assistant_spans(
        &self,
        messages: &[Value],
    ) -> Result<(String, Vec<(usize, usize)>), String> {
        let full = self.render(messages, false)?;
        let mut spans = vec![];
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let rendered = self.render(&messages[..=i], false)?;
            let upto = &rendered[..rendered.len() - self.trailer(&rendered).len()];
            let content = m.get("content").and_then(Value::as_str).unwrap_or("");
            if upto.starts_with(&before) && full.starts_with(upto) {
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
