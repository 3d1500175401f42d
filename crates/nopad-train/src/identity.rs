//! A run's identity: everything that decides which batches, learning rates and updates it makes
//! (model config, data content, packing, schedule, optimizer, seed, world size). A checkpoint
//! stores it; resuming refuses a checkpoint whose identity differs and names each difference.
//!
//! What is left out on purpose: where things are written (out, log), how often (save-every,
//! eval-every, log-every), and where the data file lives (a moved file with the same content
//! resumes).

use std::io::Read;
use std::path::{Path, PathBuf};

use nopad_data::Example;
use nopad_model::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DataSource, TrainConfig};
use crate::error::{Result, TrainError};
use crate::optimizer::{master_name, states_name};

/// A 64-bit running checksum (a word-wise multiply-rotate hash). Not cryptographic: it detects
/// accidental changes (every single-word change changes the result, since each step is a
/// bijection of the state), and it runs at memory speed on multi-GB data files.
#[derive(Clone, Copy, Debug)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("chunks of 8")));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 56));
    }
    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Size and checksum of a file's bytes, streamed.
fn file_checksum(path: &Path) -> Result<(u64, String)> {
    let io = |e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut sum, mut total) = (Checksum::new(), 0u64);
    loop {
        // Fill whole buffers so the chunking (and so the checksum) never depends on read sizes.
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]).map_err(io)? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        sum.bytes(&buf[..filled]);
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    sum.word(total);
    Ok((total, sum.hex()))
}

/// Size and checksum of the data at `path`: its file's, or (a saved dataset directory) the
/// sum of its files' sizes and a checksum over each file's size and checksum, in order.
fn data_checksum(path: &Path) -> Result<(u64, String)> {
    match nopad_data::data_files(path)?.as_slice() {
        [one] => file_checksum(one),
        files => {
            let (mut sum, mut total) = (Checksum::new(), 0u64);
            for f in files {
                let (n, hex) = file_checksum(f)?;
                sum.bytes(hex.as_bytes());
                sum.word(n);
                total += n;
            }
            Ok((total, sum.hex()))
        }
    }
}

/// Checksum of examples as tokenized: catches a changed tokenizer, template, format, long policy
/// or max-len even when the file is the same.
fn examples_checksum(examples: &[Example]) -> String {
    let mut sum = Checksum::new();
    for e in examples {
        sum.word(e.len() as u64);
        for (&t, &l) in e.input_ids.iter().zip(&e.labels) {
            sum.word((t as u32 as u64) | ((l as u32 as u64) << 32));
        }
    }
    sum.hex()
}

/// Checksum of a model config as HF would write it (element type left out: it does not change
/// the architecture).
pub fn config_hash(cfg: &Config) -> String {
    let text = serde_json::to_string(&cfg.to_hf_json("float32")).expect("JSON values serialise");
    let mut sum = Checksum::new();
    sum.bytes(text.as_bytes());
    sum.hex()
}

/// Which data a run trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DataIdentity {
    /// `file`, `synthetic-flan` or `synthetic-orcamath`.
    pub source: String,
    /// The file, when there is one (informative: not compared).
    pub path: Option<PathBuf>,
    /// File size in bytes.
    pub bytes: Option<u64>,
    /// Checksum of the file's bytes.
    pub checksum: Option<String>,
    /// Examples after loading.
    pub examples: usize,
    /// Checksum of the tokenized examples.
    pub examples_checksum: String,
}

/// The AdamW settings of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AdamWIdentity {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Gradient clipping.
    pub max_grad_norm: Option<f32>,
}

fn f32_name() -> String {
    "f32".into()
}

/// The LoRA settings of a run: its `adapter_config.json` (base left out: where the model lies
/// does not change the run), plus `adapter-checksum`, the checksum of the adapter it started
/// from (`--adapter`), if any, and `base-dtype` when the base is not bf16 (so a bf16 run's
/// identity is what it was before NF4 bases existed).
fn lora_identity(lt: &crate::LoraTrain) -> Result<Value> {
    let mut v = nopad_model::lora::peft::adapter_config(&lt.settings, "");
    if let Some(map) = v.as_object_mut() {
        if let Some(d) = &lt.adapter {
            let sum = file_checksum(&d.join(nopad_model::lora::peft::ADAPTER_FILE))?.1;
            map.insert("adapter-checksum".into(), Value::String(sum));
        }
        if lt.base != nopad_model::quant::BaseDtype::Bf16 {
            map.insert("base-dtype".into(), Value::String(lt.base.name().into()));
        }
    }
    Ok(v)
}

/// Everything that must be equal for a resumed run to continue the interrupted one exactly.
/// Keys are the CLI's flag names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunIdentity {
    /// Checksum of the model's config.json (see [`config_hash`]).
    pub model_config: String,
    /// The data.
    pub data: DataIdentity,
    /// Packing strategy.
    pub strategy: String,
    /// Examples (or rows) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Longest example or row.
    pub max_len: usize,
    /// Length-grouped sampling.
    pub group_by_length: bool,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Steps asked for.
    pub steps: Option<u64>,
    /// Epochs asked for.
    pub epochs: Option<f64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up updates.
    pub warmup: u64,
    /// Warm-up as a fraction of the run (wins over `warmup`; absent when not given, so the
    /// identity of a run without it is what it was before the flag existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Decay after warm-up.
    pub schedule: String,
    /// Optimizer settings.
    pub adamw: AdamWIdentity,
    /// Precision of the moments (`f32`, `bf16`, `8bit`; checkpoints from before it: `f32`).
    #[serde(default = "f32_name")]
    pub optim_states: String,
    /// Master weights (`f32`, `none`; checkpoints from before it: `f32`).
    #[serde(default = "f32_name")]
    pub master_weights: String,
    /// Processes training together (1 until data parallelism lands).
    pub world_size: usize,
    /// LoRA settings (see [`RunIdentity::new`]); absent for full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Value>,
}

impl RunIdentity {
    /// The identity of the run `tc` describes, with its model config and loaded examples. A
    /// LoRA run's `lora` is its `adapter_config.json` (without the base's path) plus, when it
    /// started from an adapter, that adapter's checksum.
    pub fn new(tc: &TrainConfig, cfg: &Config, examples: &[Example]) -> Result<Self> {
        let data = match &tc.data {
            DataSource::File(p) => {
                let (bytes, checksum) = data_checksum(p)?;
                DataIdentity {
                    source: "file".into(),
                    path: Some(p.clone()),
                    bytes: Some(bytes),
                    checksum: Some(checksum),
                    examples: examples.len(),
                    examples_checksum: examples_checksum(examples),
                }
            }
            DataSource::Synthetic { dist, .. } => DataIdentity {
                source: match dist {
                    nopad_data::synthetic::LengthDist::FlanLike => "synthetic-flan",
                    nopad_data::synthetic::LengthDist::OrcaMathLike => "synthetic-orcamath",
                }
                .into(),
                path: None,
                bytes: None,
                checksum: None,
                examples: examples.len(),
                examples_checksum: examples_checksum(examples),
            },
        };
        let a = &tc.adamw;
        Ok(RunIdentity {
            model_config: config_hash(cfg),
            data,
            strategy: tc.strategy.name().into(),
            batch_size: tc.batch_size,
            grad_accum: tc.grad_accum,
            max_len: tc.max_len,
            group_by_length: tc.group_by_length,
            seed: tc.seed,
            steps: tc.steps,
            epochs: if tc.steps.is_some() { None } else { tc.epochs },
            lr: tc.lr,
            min_lr: tc.min_lr,
            warmup: tc.warmup,
            warmup_ratio: tc.warmup_ratio,
            schedule: tc.decay.name().into(),
            adamw: AdamWIdentity {
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
                max_grad_norm: a.max_grad_norm,
            },
            optim_states: states_name(a.states).into(),
            master_weights: master_name(a.master).into(),
            world_size: 1,
            lora: tc.lora.as_ref().map(lora_identity).transpose()?,
        })
    }

    /// The differences a resumed run may make, split from the ones it may not: `(refused,
    /// allowed)`. Allowed: the run's length (`steps`, `epochs`) and its learning rate (`lr`,
    /// `min-lr`); the schedule continues with [`crate::schedule::Schedule::continued`].
    pub fn split_changes(&self, saved: &RunIdentity) -> (Vec<String>, Vec<String>) {
        let allowed = RunIdentity {
            steps: self.steps,
            epochs: self.epochs,
            lr: self.lr,
            min_lr: self.min_lr,
            ..saved.clone()
        };
        (self.differences(&allowed), allowed.differences(saved))
    }

    /// The differences between a checkpoint's identity (`saved`) and this run's, one line each,
    /// naming the key and both values; empty when the run may resume.
    pub fn differences(&self, saved: &RunIdentity) -> Vec<String> {
        let now = serde_json::to_value(self).expect("identities serialise");
        let then = serde_json::to_value(saved).expect("identities serialise");
        let mut out = vec![];
        diff("", &then, &now, &mut out);
        if out.iter().any(|d| d.starts_with("`data.")) {
            let show = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or("synthetic data".into(), |p| p.display().to_string())
            };
            out.push(format!(
                "(the checkpoint was trained on {}; this run reads {})",
                show(&saved.data.path),
                show(&self.data.path)
            ));
        }
        out
    }
}

fn diff(prefix: &str, then: &Value, now: &Value, out: &mut Vec<String>) {
    if let (Value::Object(a), Value::Object(b)) = (then, now) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let key = format!("{prefix}{k}");
            if key == "data.path" {
                continue;
            }
            let (x, y) = (
                a.get(k).unwrap_or(&Value::Null),
                b.get(k).unwrap_or(&Value::Null),
            );
            diff(&format!("{key}."), x, y, out);
        }
        return;
    }
    if then != now {
        let key = prefix.trim_end_matches('.');
        let what = match key {
            "model-config" => "model (config.json checksum)",
            "data.checksum" | "data.bytes" => "data file content",
            "data.examples-checksum" | "data.examples" => {
                "data as tokenized (tokenizer, format, template, long policy or max-len)"
            }
            "data.source" => "data",
            _ => key,
        };
        let show = |v: &Value| match v {
            Value::Null => "unset".to_string(),
            v => v.to_string(),
        };
        let what = if what == key {
            String::new()
        } else {
            format!(" ({what})")
        };
        out.push(format!(
            "`{key}`{what}: checkpoint {}, this run {}",
            show(then),
            show(now)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_see_single_changes_and_ignore_read_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bin");
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (n, a) = file_checksum(&p).unwrap();
        assert_eq!(n, data.len() as u64);
        let mut other = data.clone();
        other[2_000_000] ^= 1;
        std::fs::write(&p, &other).unwrap();
        assert_ne!(file_checksum(&p).unwrap().1, a);
        std::fs::write(&p, &data[..data.len() - 1]).unwrap();
        assert_ne!(file_checksum(&p).unwrap().1, a);
    }

    #[test]
    fn differences_name_each_key() {
        let tc = TrainConfig::default_cpu();
        let cfg = Config::preset("tiny").unwrap();
        let ex = vec![Example {
            input_ids: vec![1, 2, 3],
            labels: vec![-100, 2, 3],
        }];
        let a = RunIdentity::new(&tc, &cfg, &ex).unwrap();
        assert!(a.differences(&a.clone()).is_empty());
        let mut b = a.clone();
        b.strategy = "pad".into();
        b.data.examples_checksum = "0".into();
        b.data.path = Some("elsewhere.jsonl".into());
        let d = a.differences(&b).join("\n");
        assert!(d.contains("`strategy`") && d.contains("\"pad\""), "{d}");
        assert!(d.contains("data as tokenized"), "{d}");
        assert!(
            !d.contains("`data.path`") && d.contains("trained on elsewhere.jsonl"),
            "{d}"
        );
        assert_eq!(a.differences(&b).len(), 3);
    }
}
