//! Generation from a model with a KV cache: what a call asks for ([`GenerateOptions`]: the
//! length, the [`Sampling`], the seed and the end-of-sequence ids), what it returns
//! ([`Generated`]), the end-of-sequence ids of a model directory ([`eos_ids`]), and the buffers
//! it allocates ([`parts`], [`bytes`]), which `model/decode.rs` allocates from and the memory
//! plan counts, so the two cannot drift.
//!
//! The decoding itself is [`crate::Model::generate`] (`model/decode.rs`): the prompts prefilled
//! as one packed row through the training forward (positions restart per prompt), every layer's
//! keys and values (after RoPE) appended to the cache, then one token per live sequence per
//! step through the same layer code with the attention of `Ops::decode_attention` over the
//! cache. `sample.rs` chooses each token.

use std::path::Path;

use nopad_backend::Kind;
use serde_json::Value;

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::lora::AdapterLayout;
use crate::memory::{act_parts, held, Device, Part};
use crate::recompute::Recompute;

mod sample;
pub use sample::{argmax, Sampling};

#[cfg(test)]
mod tests;

/// What one [`crate::Model::generate`] call does.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens generated per prompt at most.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Seed of the draws: prompt i draws from its own stream, `(seed, i)`, so its tokens do not
    /// depend on the other prompts of the batch.
    pub seed: u64,
    /// A sequence ends after generating any of these (kept as its last token).
    pub eos: Vec<i32>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// It generated an end-of-sequence id.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

impl Stop {
    /// `eos` or `length` (HF's `finish_reason` words: `stop` is `eos` here).
    pub fn name(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::Length => "length",
        }
    }
}

/// One prompt's generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The new ids, the end-of-sequence id included when it ended on one.
    pub ids: Vec<i32>,
    /// Why it ended.
    pub stop: Stop,
    /// Seconds from the start of the call to this sequence's last token (its prefill shared
    /// with the batch).
    pub seconds: f64,
}

/// The end-of-sequence ids of a model, as HF `generate` takes them: `eos_token_id` (a number
/// or a list) of `generation_config.json` in `dir` when that file sets it, else of its config.
pub fn eos_ids(cfg: &Config, dir: Option<&Path>) -> Result<Vec<i32>> {
    if let Some(path) = dir.map(|d| d.join("generation_config.json")) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
                path: path.clone(),
                msg: format!("line {}: {e}", e.line()),
            })?;
            let name = path.display().to_string();
            if let Some(ids) = v.get("eos_token_id").filter(|v| !v.is_null()) {
                return ids_of(Some(ids), &name);
            }
        }
    }
    ids_of(cfg.eos_token_id.as_ref(), "config.json")
}

/// The ids of an `eos_token_id` value: none, a number, or a list of numbers.
fn ids_of(v: Option<&Value>, path: &str) -> Result<Vec<i32>> {
    let bad = |v: &Value| ModelError::Config {
        path: path.to_string(),
        field: "eos_token_id".into(),
        msg: format!("expected a token id or a list of them, found {v}"),
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|x| i32::try_from(x).ok())
            .ok_or_else(|| bad(v))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The cache rows of sequences of `prompts` tokens that generate up to `max_new` each: room for
/// every token a step feeds back (the last one generated never is).
pub fn cache_rows(prompts: &[usize], max_new: usize) -> usize {
    prompts.iter().map(|&p| p + max_new.saturating_sub(1)).sum()
}

/// The buffers one generation allocates, in the order `model/decode.rs` takes them: the KV
/// cache `[L, rows, 2·Hkv·Dh]`; one layer's activations sized for the prefill's N tokens (the
/// training forward's `LayerActs`: rstd1, qkv, att, lse, res_mid, rstd2, gu); the layer scratch
/// the forward reads (h, a; the backward's buffers empty); two residual streams `[N, D]`; the
/// last rows `[S, D]`, their norm and reciprocal RMS, the logits `[S, V]`; with adapters, their
/// `u` `[adapters, N, r]` and scratch (`t`, `du`, and an empty dropout buffer).
pub fn parts(
    cfg: &Config,
    adapter: Option<&AdapterLayout>,
    prompts: &[usize],
    max_new: usize,
) -> Vec<Part> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let cw = 2 * cfg.num_key_value_heads * cfg.head_dim;
    let (n, s) = (prompts.iter().sum::<usize>(), prompts.len());
    let rows = cache_rows(prompts, max_new);
    let (c, m) = (Kind::Compute, Kind::Master);
    let mut p = vec![(cfg.num_hidden_layers * rows * cw, c)];
    // One layer's `LayerActs` for n tokens, gate/up kept: what full recomputation shares.
    p.extend(act_parts(cfg, n, Recompute::Full, 0).shared_layer);
    p.extend([(n * d, c), (n * f, c)]);
    // The backward's scratch (rstd_tmp, d_res, d_h, d_qkv, d_att, d_a, gu): never written.
    p.extend([(0, m), (0, c), (0, c), (0, c), (0, c), (0, c), (0, c)]);
    p.extend([
        (n * d, c),
        (n * d, c),
        (s * d, c),
        (s * d, c),
        (s, m),
        (s * v, c),
    ]);
    if let Some(a) = adapter {
        let (r, per) = (a.r, a.per_layer());
        p.extend([(per * n * r, c), (n * r, c), (0, c)]);
    }
    p
}

/// Bytes of [`parts`] on a device, plus (where ops take their scratch from the same pool,
/// CUDA) the uploaded id, position and row arrays and the decode attention's partial results,
/// bounded above.
pub fn bytes(
    cfg: &Config,
    adapter: Option<&AdapterLayout>,
    prompts: &[usize],
    max_new: usize,
    dev: &Device<'_>,
) -> usize {
    let one = |(len, kind): Part| held(len * (dev.size)(kind), &dev.acc);
    let own: usize = parts(cfg, adapter, prompts, max_new)
        .into_iter()
        .map(one)
        .sum();
    if !dev.acc.pooled_scratch || prompts.is_empty() {
        return own;
    }
    let (n, s) = (prompts.iter().sum::<usize>(), prompts.len());
    let ints = |len: usize| held(4 * len, &dev.acc);
    // Prefill: tokens, positions, cu_seqlens, the cache's pairs, the last rows' pairs; a
    // step: tokens, positions, pairs, spans.
    let uploads = 2 * ints(n) + ints(s + 1) + ints(2 * n) + ints(2 * s) + 4 * ints(2 * s);
    let longest = prompts.iter().max().map_or(0, |&p| p + max_new);
    let chunks = longest.div_ceil(64).max(1);
    let partial = s * cfg.num_attention_heads * chunks;
    own + uploads + held(4 * partial * cfg.head_dim, &dev.acc) + held(8 * partial, &dev.acc)
}
