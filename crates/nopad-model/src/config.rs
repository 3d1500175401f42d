//! The Llama-family configuration: read from a Hugging Face `config.json` (or a built-in preset),
//! validated once, and written back in a form HF Transformers loads.
//!
//! Unknown keys in `config.json` are ignored (HF configs carry many that do not change the
//! maths, such as `use_cache`); every key that does change the maths is read, and a value nopad
//! cannot honour is an error naming the key. Which layers attend within a sliding window
//! (`sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types`) is `window.rs`.
//!
//! Over 600 lines: the reader and the writer of one format, kept side by side so that every key
//! read is seen written back, and the presets are that format's text.

use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

mod window;
pub use window::LayerType;

/// The supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2, Llama 3.x).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (q/k/v biases).
    Qwen2,
    /// `Qwen3ForCausalLM` (dense): RMSNorm of every query and key head (`q_norm`, `k_norm`)
    /// before RoPE; biases on q/k/v/o only with `attention_bias`.
    Qwen3,
}

impl Arch {
    /// HF class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1/3.2 frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength threshold factor for the low band.
        low_freq_factor: f64,
        /// Wavelength threshold factor for the high band.
        high_freq_factor: f64,
        /// Context length the base model was trained with.
        original_max_position_embeddings: f64,
    },
    /// YaRN (`rope_type: "yarn"`): frequencies blended between interpolated and extrapolated by
    /// a ramp over the dimensions, and the attention logits scaled (HF scales cos and sin by the
    /// attention factor; nopad scales the softmax by its square, the same product).
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Context length the base model was trained with.
        original_max_position_embeddings: f64,
        /// Rotations where the ramp starts extrapolating (HF default 32).
        beta_fast: f64,
        /// Rotations where the ramp ends (HF default 1).
        beta_slow: f64,
        /// The cos/sin scale, when given; else from `factor`, `mscale`, `mscale_all_dim`.
        attention_factor: Option<f64>,
        /// YaRN's `mscale`, when given.
        mscale: Option<f64>,
        /// YaRN's `mscale_all_dim`, when given.
        mscale_all_dim: Option<f64>,
        /// Whether the correction range is rounded outwards to whole dimensions (HF default).
        truncate: bool,
    },
    /// Dynamic NTK (`rope_type: "dynamic"`). HF rescales the base only for a sequence longer than
    /// `max_position_embeddings`; nopad trains examples up to that length, where it is plain RoPE,
    /// and refuses a longer `max_len`.
    Dynamic {
        /// Scale factor (applies beyond `max_position_embeddings` only).
        factor: f64,
    },
}

impl RopeScaling {
    /// YaRN's attention factor, as HF derives it (1 for every other scaling): given, or
    /// `m(factor, mscale) / m(factor, mscale_all_dim)` when both are given, else `m(factor, 1)`,
    /// where `m(s, k) = 0.1·k·ln(s) + 1` for s > 1 and 1 otherwise.
    pub fn attention_factor(&self) -> f64 {
        let m = |s: f64, k: f64| {
            if s <= 1.0 {
                1.0
            } else {
                0.1 * k * s.ln() + 1.0
            }
        };
        match self {
            RopeScaling::Yarn {
                factor,
                attention_factor,
                mscale,
                mscale_all_dim,
                ..
            } => match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(ms), Some(ma)) if *ms != 0.0 && *ma != 0.0 => {
                    m(*factor, *ms) / m(*factor, *ma)
                }
                _ => m(*factor, 1.0),
            },
            _ => 1.0,
        }
    }
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size D.
    pub hidden_size: usize,
    /// MLP width F.
    pub intermediate_size: usize,
    /// Decoder layers L.
    pub num_hidden_layers: usize,
    /// Query heads H.
    pub num_attention_heads: usize,
    /// Key/value heads Hkv (divides H).
    pub num_key_value_heads: usize,
    /// Head dimension Dh (even).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model was configured for (informational; not enforced).
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm over each query and key head before RoPE, with weights `[Dh]` of its own for the
    /// queries and the keys (Qwen3's `q_norm`, `k_norm`; eps `rms_norm_eps`).
    pub qk_norm: bool,
    /// Sliding-window attention size W, as HF keeps it (a query sees itself and the W − 1 keys
    /// before it); which layers use it is [`Config::layer_window`].
    pub sliding_window: Option<usize>,
    /// HF's `layer_types`, one per layer: as `config.json` gives them, or (Qwen2) as HF derives
    /// them from `max_window_layers`; `None` where neither applies. Written back on export.
    pub layer_types: Option<Vec<LayerType>>,
    /// Standard deviation of the random initialisation.
    pub initializer_range: f64,
    /// Token ids from the config, kept for saving.
    pub bos_token_id: Option<Value>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<Value>,
    /// Padding id.
    pub pad_token_id: Option<Value>,
}

struct Reader<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.to_string(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }
    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    /// The value at `key` converted by `get`, `None` when absent or null; `expected` names the
    /// type in the error when `get` refuses it.
    fn typed<'v, T>(
        &'v self,
        key: &str,
        expected: &str,
        get: impl Fn(&'v Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => get(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected {expected}, found {v}"))),
        }
    }
    /// A non-negative integer, refused above the key's bound in [`SIZE_LIMITS`] so that no size
    /// from an untrusted file reaches an allocation or overflows a product.
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.typed(key, "a non-negative integer", Value::as_u64)? else {
            return Ok(None);
        };
        let max = SIZE_LIMITS
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(u64::MAX, |&(_, m)| m);
        if v > max {
            return Err(self.err(
                key,
                format!("{v} is larger than nopad accepts ({max}); is config.json damaged?"),
            ));
        }
        usize::try_from(v).map(Some).map_err(|_| {
            self.err(
                key,
                format!("{v} does not fit this machine's address space"),
            )
        })
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing (required)"))
    }
    fn positive(&self, key: &str) -> Result<usize> {
        let v = self.usize(key)?;
        if v == 0 {
            return Err(self.err(key, "must be at least 1"));
        }
        Ok(v)
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false", Value::as_bool)
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }
}

/// Upper bounds of the size keys of `config.json`, far above any published model (the largest
/// have vocabularies of ~2^18, hidden sizes of ~2^14, ~2^7 layers) and low enough that products
/// of them cannot overflow: a config beyond them is damaged or hostile, and is refused before
/// anything is allocated.
pub const SIZE_LIMITS: &[(&str, u64)] = &[
    ("vocab_size", 1 << 24),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1 << 12),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 12),
    ("max_position_embeddings", 1 << 30),
    ("sliding_window", 1 << 30),
    ("pretraining_tp", 1 << 12),
];

/// Largest model accepted, in parameters (2^40: 4 TiB of fp32 weights alone).
pub const MAX_PARAMS: u64 = 1 << 40;

impl Config {
    /// Parses and validates an HF `config.json` text; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &str) -> Result<Config> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Format {
            path: path.into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| ModelError::Format {
            path: path.into(),
            msg: "expected a JSON object".into(),
        })?;
        Config::from_map(obj, path)
    }

    fn from_map(obj: &Map<String, Value>, path: &str) -> Result<Config> {
        let r = Reader { path, obj };
        let arch = match r.present("architectures") {
            Some(Value::Array(a)) if a.len() == 1 => match a[0].as_str() {
                Some("LlamaForCausalLM") => Arch::Llama,
                Some("MistralForCausalLM") => Arch::Mistral,
                Some("Qwen2ForCausalLM") => Arch::Qwen2,
                Some("Qwen3ForCausalLM") => Arch::Qwen3,
                _ => {
                    return Err(r.err(
                        "architectures",
                        format!("unsupported architecture {}; nopad supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM", a[0]),
                    ))
                }
            },
            Some(v) => return Err(r.err("architectures", format!("expected a list of one class name, found {v}"))),
            None => match r.str_opt("model_type")? {
                Some("llama") => Arch::Llama,
                Some("mistral") => Arch::Mistral,
                Some("qwen2") => Arch::Qwen2,
                Some("qwen3") => Arch::Qwen3,
                Some(other) => return Err(r.err("model_type", format!("unsupported model type `{other}`"))),
                None => return Err(r.err("architectures", "missing (required, or give model_type)")),
            },
        };
        let hidden_size = r.positive("hidden_size")?;
        let heads = r.positive("num_attention_heads")?;
        let kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(r.err(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(h) => h,
            // Qwen3Config's default, whatever hidden_size / heads is.
            None if arch == Arch::Qwen3 => 128,
            None => {
                if !hidden_size.is_multiple_of(heads) {
                    return Err(r.err("head_dim", format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}")));
                }
                hidden_size / heads
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(r.err(
                "head_dim",
                format!("{head_dim} must be a positive even number for rotary embeddings"),
            ));
        }
        if let Some(act) = r.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(r.err(
                    "hidden_act",
                    format!("`{act}` is not supported (only silu, the SwiGLU MLP)"),
                ));
            }
        }
        if r.bool_opt("mlp_bias")?.unwrap_or(false) {
            return Err(r.err("mlp_bias", "MLP biases are not supported"));
        }
        if let Some(p) = r.f64_opt("attention_dropout")? {
            if p != 0.0 {
                return Err(r.err(
                    "attention_dropout",
                    format!("{p}: dropout is not supported (use 0)"),
                ));
            }
        }
        if let Some(tp) = r.usize_opt("pretraining_tp")? {
            if tp != 1 {
                return Err(r.err("pretraining_tp", format!("{tp}: only 1 is supported")));
            }
        }
        let attention_bias = r.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama | Arch::Qwen3 => (attention_bias, attention_bias),
            Arch::Mistral => (false, false),
        };
        let num_hidden_layers = r.positive("num_hidden_layers")?;
        let (sliding_window, layer_types) = window::read(&r, arch, num_hidden_layers)?;
        // RoPE: transformers 4 writes rope_theta + rope_scaling, transformers 5 rope_parameters.
        let params = r
            .present("rope_parameters")
            .or_else(|| r.present("rope_scaling"));
        let params_key = if r.present("rope_parameters").is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let mut rope_theta = r.f64_opt("rope_theta")?.unwrap_or(10000.0);
        let rope_scaling = match params {
            None => RopeScaling::None,
            Some(Value::Object(p)) => {
                let pr = Reader { path, obj: p };
                if let Some(t) = pr.f64_opt("rope_theta")? {
                    rope_theta = t;
                }
                let kind = pr
                    .str_opt("rope_type")?
                    .or(pr.str_opt("type")?)
                    .unwrap_or("default");
                let num = |k: &str| -> Result<f64> {
                    pr.f64_opt(k)?.ok_or_else(|| {
                        r.err(
                            &format!("{params_key}.{k}"),
                            "missing (required for this rope_type)",
                        )
                    })
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: num("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    "yarn" => {
                        let max_pos = r.usize_opt("max_position_embeddings")?.unwrap_or(2048);
                        let original = pr
                            .f64_opt("original_max_position_embeddings")?
                            .unwrap_or(max_pos as f64);
                        RopeScaling::Yarn {
                            factor: pr.f64_opt("factor")?.unwrap_or(max_pos as f64 / original),
                            original_max_position_embeddings: original,
                            beta_fast: pr.f64_opt("beta_fast")?.unwrap_or(32.0),
                            beta_slow: pr.f64_opt("beta_slow")?.unwrap_or(1.0),
                            attention_factor: pr.f64_opt("attention_factor")?,
                            mscale: pr.f64_opt("mscale")?,
                            mscale_all_dim: pr.f64_opt("mscale_all_dim")?,
                            truncate: pr.bool_opt("truncate")?.unwrap_or(true),
                        }
                    }
                    "dynamic" => RopeScaling::Dynamic {
                        factor: num("factor")?,
                    },
                    other => {
                        return Err(r.err(
                            &format!("{params_key}.rope_type"),
                            format!(
                            "`{other}` is not supported (default, linear, llama3, yarn, dynamic)"
                        ),
                        ))
                    }
                }
            }
            Some(v) => return Err(r.err(params_key, format!("expected an object, found {v}"))),
        };
        if rope_theta <= 0.0 {
            return Err(r.err("rope_theta", format!("{rope_theta} must be positive")));
        }
        let cfg = Config {
            arch,
            vocab_size: r.positive("vocab_size")?,
            hidden_size,
            intermediate_size: r.positive("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            layer_types,
            initializer_range: r.f64_opt("initializer_range")?.unwrap_or(0.02),
            bos_token_id: r.present("bos_token_id").cloned(),
            eos_token_id: r.present("eos_token_id").cloned(),
            pad_token_id: r.present("pad_token_id").cloned(),
        };
        if cfg.rms_norm_eps.is_nan() || cfg.rms_norm_eps <= 0.0 {
            return Err(r.err(
                "rms_norm_eps",
                format!("{} must be positive", cfg.rms_norm_eps),
            ));
        }
        let params = cfg.param_count_bound();
        if params > u128::from(MAX_PARAMS) {
            return Err(r.err(
                "num_hidden_layers",
                format!(
                    "with hidden_size {}, intermediate_size {}, vocab_size {} and {} layers the \
                     model has about {params} parameters, more than nopad accepts ({MAX_PARAMS})",
                    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
                ),
            ));
        }
        Ok(cfg)
    }

    /// The `config.json` HF Transformers loads for this model.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut m = json!({
            "architectures": [self.arch.hf_name()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
            "use_cache": true,
        });
        let obj = m.as_object_mut().expect("json! object literal");
        match &self.rope_scaling {
            RopeScaling::None => {
                obj.insert("rope_scaling".into(), Value::Null);
            }
            RopeScaling::Linear { factor } => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "linear", "factor": factor}),
                );
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                           "high_freq_factor": high_freq_factor,
                           "original_max_position_embeddings": *original_max_position_embeddings as u64}),
                );
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let mut y = json!({"rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": *original_max_position_embeddings as u64,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate});
                let o = y.as_object_mut().expect("json! object literal");
                for (k, v) in [
                    ("attention_factor", attention_factor),
                    ("mscale", mscale),
                    ("mscale_all_dim", mscale_all_dim),
                ] {
                    if let Some(v) = v {
                        o.insert(k.into(), json!(v));
                    }
                }
                obj.insert("rope_scaling".into(), y);
            }
            RopeScaling::Dynamic { factor } => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "dynamic", "factor": factor}),
                );
            }
        }
        match self.arch {
            Arch::Llama => {
                obj.insert("attention_bias".into(), json!(self.o_bias));
                obj.insert("mlp_bias".into(), json!(false));
            }
            Arch::Mistral => {
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Arch::Qwen2 | Arch::Qwen3 => {
                if self.arch == Arch::Qwen3 {
                    obj.insert("attention_bias".into(), json!(self.o_bias));
                }
                obj.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
        }
        window::write(self, obj);
        for (k, v) in [
            ("bos_token_id", &self.bos_token_id),
            ("eos_token_id", &self.eos_token_id),
            ("pad_token_id", &self.pad_token_id),
        ] {
            if let Some(v) = v {
                obj.insert(k.into(), v.clone());
            }
        }
        m
    }

    /// The parameter count, computed in `u128` so that no config can overflow it (the exact
    /// count of a model nopad builds is `Layout::new(..).total`, which counts biases too; this
    /// bound adds them at their largest).
    fn param_count_bound(&self) -> u128 {
        let [v, d, f, l, h, kv, dh] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        ]
        .map(|x| x as u128);
        let (qd, kvd) = (h * dh, kv * dh);
        let per_layer =
            d * (qd + 2 * kvd) + d * qd + 3 * d * f + 2 * d + (qd + 2 * kvd) + d + 2 * dh;
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 } * v * d;
        l * per_layer + embeddings + d
    }

    /// Query-plus-key heads that RoPE rotates, times the head dim: width of q and k in a row.
    pub fn qkv_width(&self) -> usize {
        (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
    }

    /// A built-in configuration by name; see [`PRESETS`].
    pub fn preset(name: &str) -> Option<Config> {
        let (_, _, text) = PRESETS.iter().find(|(n, _, _)| *n == name)?;
        Some(
            Config::from_json_str(text, &format!("preset {name}"))
                .expect("built-in presets are valid"),
        )
    }
}

/// Built-in presets: name, what it is, and its config.json. Real shapes use random init.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "tiny",
        "2 layers, D=16, GQA 4/2: for tests",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":97,"hidden_size":16,"intermediate_size":40,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":4096,"tie_word_embeddings":false}"#,
    ),
    (
        "tiny-qwen3",
        "2 layers, D=16, GQA 4/2 of head_dim 8, q/k norms, tied: Qwen3's paths in tests",
        r#"{"architectures":["Qwen3ForCausalLM"],"vocab_size":97,"hidden_size":16,"intermediate_size":40,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":8,"attention_bias":false,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":4096,"tie_word_embeddings":true}"#,
    ),
    (
        "small",
        "4 layers, D=128, GQA 4/2, V=512: the CPU default",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":128,"intermediate_size":352,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":4096,"tie_word_embeddings":true}"#,
    ),
    (
        "llama-100m",
        "12 layers, D=768, GQA 12/4, V=32000, tied (0.10B): quality A/B runs of optimizer modes",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":768,"intermediate_size":2048,"num_hidden_layers":12,"num_attention_heads":12,"num_key_value_heads":4,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":4096,"tie_word_embeddings":true}"#,
    ),
    (
        "llama-3.2-1b",
        "Llama-3.2-1B shape (1.24B)",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"max_position_embeddings":131072,"tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":128001}"#,
    ),
    (
        "llama-3.1-8b",
        "Llama-3.1-8B shape (8.03B)",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"max_position_embeddings":131072,"tie_word_embeddings":false,"bos_token_id":128000,"eos_token_id":128001}"#,
    ),
    (
        "llama-2-7b",
        "Llama-2-7B shape (6.74B)",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":4096,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#,
    ),
    (
        "mistral-7b",
        "Mistral-7B v0.3 shape (7.25B)",
        r#"{"architectures":["MistralForCausalLM"],"vocab_size":32768,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"rms_norm_eps":1e-5,"rope_theta":1000000.0,"sliding_window":null,"max_position_embeddings":32768,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#,
    ),
    (
        "qwen2.5-0.5b",
        "Qwen2.5-0.5B shape (0.49B, q/k/v biases, tied)",
        r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":151936,"hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":32768,"tie_word_embeddings":true,"use_sliding_window":false,"sliding_window":32768,"bos_token_id":151643,"eos_token_id":151643}"#,
    ),
    (
        "qwen3-0.6b",
        "Qwen3-0.6B shape (0.60B, q/k norms, head_dim 128 over hidden 1024, tied)",
        r#"{"architectures":["Qwen3ForCausalLM"],"vocab_size":151936,"hidden_size":1024,"intermediate_size":3072,"num_hidden_layers":28,"num_attention_heads":16,"num_key_value_heads":8,"head_dim":128,"attention_bias":false,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":40960,"tie_word_embeddings":true,"use_sliding_window":false,"sliding_window":null,"max_window_layers":28,"bos_token_id":151643,"eos_token_id":151645}"#,
    ),
];
