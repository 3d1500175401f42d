//! Targets of the formats made of text: the ids of `text`, prompt/completion and conversation
//! records, and which of them are trained, as TRL's SFT trainer decides it.
//!
//! Owns the rule that maps trained text to trained tokens: a token is a target when the byte it
//! starts at is trained text. Prompt/completion records are tokenised as one text, the prompt
//! followed by the completion (TRL tokenises `prompt + completion`), so a SentencePiece tokenizer
//! puts no `▁` of its own at the completion's start; a token that holds the prompt's last byte
//! and the completion's first (a prompt ending in a space, a word cut in two) starts in the
//! prompt and is not trained, as in TRL, whose mask is the length of the prompt's own ids.
//! Conversations are rendered by `template.rs`; the text of each record is kept for
//! `nopad inspect` when asked.

use serde_json::Value;

use crate::records::Record;
use crate::tokenize::{Encoded, ModelTokenizer};
use crate::{Example, IGNORE_INDEX};

/// The text a record's ids were made from, and where each id lies in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    /// The text the tokenizer saw: the text, the prompt and completion joined, or the
    /// conversation as the chat template renders it.
    pub text: String,
    /// One entry per id: the bytes of `text` it comes from, or `None` for an id added as an id
    /// (BOS, and the EOS a completion or text ends with).
    pub spans: Vec<Option<(usize, usize)>>,
}

/// A record's example and, when asked, the text it was made from.
pub(crate) struct Built {
    pub example: Example,
    pub shown: Option<Shown>,
}

/// Ids under construction, with the span of text each comes from.
struct Ids {
    ids: Vec<i32>,
    spans: Vec<Option<(usize, usize)>>,
}

impl Ids {
    /// `[BOS]` when the tokenizer's rules add one and the text does not already start with it,
    /// then the text's ids.
    fn new(tok: &ModelTokenizer, enc: Encoded) -> Ids {
        let mut out = Ids {
            ids: vec![],
            spans: vec![],
        };
        match tok.bos_id() {
            Some(id) if tok.adds_bos() && enc.ids.first() != Some(&id) => out.push(id),
            _ => {}
        }
        out.ids.extend(enc.ids);
        out.spans.extend(enc.spans.into_iter().map(Some));
        out
    }

    fn push(&mut self, id: i32) {
        self.ids.push(id);
        self.spans.push(None);
    }

    /// Ends with EOS (a target: the model learns to stop), unless the text already wrote it.
    fn push_eos_unless_there(&mut self, eos: Option<i32>) {
        if let Some(eos) = eos {
            if self.ids.last() != Some(&eos) {
                self.push(eos);
            }
        }
    }

    /// Labels: an id whose text starts in trained text (`trained(start)`) is its own label, else
    /// -100; an id added as an id (`None` span) is a target only if `added` says so.
    fn labels(&self, trained: impl Fn(usize) -> bool, added: impl Fn(usize) -> bool) -> Vec<i32> {
        let targets = self.spans.iter().enumerate().map(|(i, s)| match s {
            Some((start, _)) => trained(*start),
            None => added(i),
        });
        self.ids
            .iter()
            .zip(targets)
            .map(|(&id, t)| if t { id } else { IGNORE_INDEX })
            .collect()
    }

    fn build(self, labels: Vec<i32>, text: Option<String>) -> Built {
        let shown = text.map(|text| Shown {
            text,
            spans: self.spans,
        });
        Built {
            example: Example {
                input_ids: self.ids,
                labels,
            },
            shown,
        }
    }

    /// Every token a target but a leading BOS (which nothing predicts).
    fn every_token(self, tok: &ModelTokenizer, text: Option<String>) -> Built {
        let mut labels = self.ids.clone();
        if tok.bos_id().is_some() && self.ids.first() == tok.bos_id().as_ref() {
            labels[0] = IGNORE_INDEX;
        }
        self.build(labels, text)
    }
}

/// The ids of `text` with their spans, or an error naming the field the text came from.
fn encode(
    rec: &Record,
    tok: &ModelTokenizer,
    field: &str,
    text: &str,
) -> Result<Encoded, crate::DataError> {
    tok.encode_with_spans(text)
        .map_err(|e| rec.err(field, format!("cannot tokenize: {e}")))
}

/// `[BOS] text EOS`, every token trained but BOS. The spans are worked out only for `explain`
/// (they cost the tokenizer some time, and nothing here needs them).
pub(crate) fn text(
    rec: &Record,
    tok: &ModelTokenizer,
    text: &str,
    explain: bool,
) -> Result<Built, crate::DataError> {
    let enc = if explain {
        encode(rec, tok, "text", text)?
    } else {
        let ids = tok
            .encode(text)
            .map_err(|e| rec.err("text", format!("cannot tokenize: {e}")))?;
        Encoded {
            spans: vec![(0, 0); ids.len()],
            ids,
        }
    };
    let mut ids = Ids::new(tok, enc);
    ids.push_eos_unless_there(tok.eos_id());
    Ok(ids.every_token(tok, explain.then(|| text.to_string())))
}

/// `[BOS] prompt+completion EOS`, the joined text tokenised once; loss on the tokens that start
/// in the completion and on EOS (on every token but BOS under `--loss-on all`).
pub(crate) fn prompt_completion(
    rec: &Record,
    tok: &ModelTokenizer,
    (prompt, completion): (&str, &str),
    fields: (&str, &str),
    all: bool,
    explain: bool,
) -> Result<Built, crate::DataError> {
    let eos = tok.eos_id().ok_or_else(|| {
        rec.err(
            fields.1,
            "the tokenizer names no eos_token (tokenizer_config.json), so the completion \
             cannot be ended",
        )
    })?;
    let joined = format!("{prompt}{completion}");
    let mut ids = Ids::new(tok, encode(rec, tok, fields.1, &joined)?);
    ids.push_eos_unless_there(Some(eos));
    let text = explain.then_some(joined);
    if all {
        return Ok(ids.every_token(tok, text));
    }
    let end = ids.ids.len() - 1;
    let labels = ids.labels(|start| start >= prompt.len(), |i| i == end);
    Ok(ids.build(labels, text))
}

/// A conversation through the chat template; loss on each assistant turn's span only (on every
/// token but BOS under `--loss-on all`).
pub(crate) fn chat(
    rec: &Record,
    tok: &ModelTokenizer,
    messages: &[Value],
    field: &str,
    all: bool,
    explain: bool,
) -> Result<Built, crate::DataError> {
    if messages.is_empty() {
        return Err(rec.err(field, "empty conversation"));
    }
    let failed = |e: String| rec.err(field, format!("chat template failed to render: {e}"));
    let template = tok.template().map_err(failed)?;
    // A conversation with no assistant turn renders with every label masked: the loader skips
    // and counts it with the other examples that have no target (or refuses it under strict).
    let (text, spans) = if all {
        let text = template.render(messages, false).map_err(failed)?;
        (text, vec![])
    } else {
        template.assistant_spans(messages).map_err(failed)?
    };
    let enc = tok
        .encode_with_spans(&text)
        .map_err(|e| rec.err(field, format!("cannot tokenize the rendered text: {e}")))?;
    // BOS per tokenizer_config.json, but never a second one when the template wrote it.
    let ids = Ids::new(tok, enc);
    let text = explain.then_some(text);
    if all {
        // The template's own BOS is no target either.
        return Ok(ids.every_token(tok, text));
    }
    let labels = ids.labels(
        |at| spans.iter().any(|&(s, e)| at >= s && at < e),
        |_| false,
    );
    Ok(ids.build(labels, text))
}
