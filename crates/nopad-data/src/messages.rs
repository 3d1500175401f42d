//! Conversations: the `messages` field of a record (OpenAI/HF shape) and the `conversations`
//! field of ShareGPT records, checked and brought to the one shape chat templates read: a list of
//! `{"role", "content"}` objects whose content is a string.
//!
//! Owns the role vocabulary of each shape (an unknown role is refused here, naming the line, the
//! role and the roles expected, before any template sees it) and the flattening of content given
//! as a list of text parts. Rendering and masking stay in `records.rs` and `tokenize.rs`.

use serde_json::{Map, Value};

use crate::error::{json_kind, DataError};
use crate::records::Record;

/// Where a record keeps its conversation, and how its turns are spelled.
pub(crate) struct Shape {
    /// The record's field holding the list of turns.
    pub field: &'static str,
    /// The key of a turn's role.
    role: &'static str,
    /// The key of a turn's text.
    content: &'static str,
    /// Each accepted role and the chat-template role it becomes.
    roles: &'static [(&'static str, &'static str)],
    /// Whether a turn's other keys (`name`, `tool_calls`, …) are handed on to the template.
    keep_other_keys: bool,
}

/// `{"messages": [{"role": "user", "content": "..."}, ...]}`; `tool` turns are passed on for
/// templates that render them.
pub(crate) const MESSAGES: Shape = Shape {
    field: "messages",
    role: "role",
    content: "content",
    roles: &[
        ("system", "system"),
        ("user", "user"),
        ("assistant", "assistant"),
        ("tool", "tool"),
    ],
    keep_other_keys: true,
};

/// ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, ...]}`, with `human`, `gpt`
/// and `system` (and the `user`/`assistant` spellings some exports use).
pub(crate) const SHAREGPT: Shape = Shape {
    field: "conversations",
    role: "from",
    content: "value",
    roles: &[
        ("human", "user"),
        ("gpt", "assistant"),
        ("system", "system"),
        ("user", "user"),
        ("assistant", "assistant"),
    ],
    keep_other_keys: false,
};

impl Shape {
    /// "a, b or c": the roles a turn may have, for error messages.
    fn expected_roles(&self) -> String {
        let names: Vec<&str> = self.roles.iter().map(|r| r.0).collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        }
    }

    /// The template role of `role`, if this shape accepts it.
    fn template_role(&self, role: &str) -> Option<&'static str> {
        self.roles.iter().find(|r| r.0 == role).map(|r| r.1)
    }
}

/// The conversation of `rec` in `shape`, as `{"role", "content"}` objects with string content.
/// Every error names the record's line and the field at fault (`messages[2].content[0]`).
pub(crate) fn conversation(rec: &Record, shape: &Shape) -> Result<Vec<Value>, DataError> {
    let items = rec.get(shape.field)?;
    let Value::Array(items) = items else {
        let msg = format!("expected an array, found {}", json_kind(items));
        return Err(rec.err(shape.field, msg));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| turn(rec, shape, i, m))
        .collect()
}

fn turn(rec: &Record, shape: &Shape, i: usize, m: &Value) -> Result<Value, DataError> {
    let at = |key: &str| format!("{}[{i}]{key}", shape.field);
    let Value::Object(m) = m else {
        let msg = format!("expected an object, found {}", json_kind(m));
        return Err(rec.err(&at(""), msg));
    };
    let role = match m.get(shape.role) {
        Some(Value::String(r)) => r,
        None => return Err(rec.err(&at(&format!(".{}", shape.role)), "missing")),
        Some(v) => {
            let msg = format!("expected a string, found {}", json_kind(v));
            return Err(rec.err(&at(&format!(".{}", shape.role)), msg));
        }
    };
    let content_field = at(&format!(".{}", shape.content));
    let content = match m.get(shape.content) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(rec, &content_field, parts)?,
        None => return Err(rec.err(&content_field, "missing")),
        Some(v) => {
            let msg = format!(
                "expected a string or a list of text parts, found {}",
                json_kind(v)
            );
            return Err(rec.err(&content_field, msg));
        }
    };
    let to = shape.template_role(role).ok_or_else(|| {
        let msg = format!(
            "unknown role `{role}` (expected {})",
            shape.expected_roles()
        );
        rec.err(&at(&format!(".{}", shape.role)), msg)
    })?;
    let mut out = if shape.keep_other_keys {
        m.clone()
    } else {
        Map::new()
    };
    out.insert("role".into(), Value::String(to.into()));
    out.insert("content".into(), Value::String(content));
    Ok(Value::Object(out))
}

/// `[{"type": "text", "text": "..."}, ...]` joined into one string, as the templates that accept
/// part lists (Gemma 3, Qwen2-VL) write them: one after the other, nothing between. Any other
/// part type is refused: this engine trains on text only.
fn text_parts(rec: &Record, field: &str, parts: &[Value]) -> Result<String, DataError> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        let part_field = format!("{field}[{j}]");
        let Value::Object(p) = p else {
            let msg = format!("expected a text part object, found {}", json_kind(p));
            return Err(rec.err(&part_field, msg));
        };
        match (p.get("type"), p.get("text")) {
            (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => text.push_str(s),
            (Some(Value::String(t)), _) if t != "text" => {
                let msg = format!("part of type `{t}` is not supported (only `text` parts are)");
                return Err(rec.err(&part_field, msg));
            }
            (Some(Value::String(_)), _) => {
                return Err(rec.err(&format!("{part_field}.text"), "missing or not a string"))
            }
            _ => return Err(rec.err(&format!("{part_field}.type"), "missing or not a string")),
        }
    }
    Ok(text)
}
