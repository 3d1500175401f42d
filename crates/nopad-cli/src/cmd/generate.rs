//! `nopad generate`: completions of one prompt or a file of them from a model (a directory, a
//! preset or a cached Hub id, with a LoRA adapter on top if asked), decoded together with a KV
//! cache (`nopad_model::Model::generate`), greedy or sampled; and the `--sample-*` flags that
//! `nopad train` takes to generate from its weights as it trains.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use nopad_backend::Backend;
use nopad_model::generate::{eos_ids, GenerateOptions, Sampling};
use nopad_train::{
    build_adapter_eval_model, build_eval_model, completion_text, model_tokenizer, read_prompts,
    ModelSource, Prompt, PromptInput, SampleConfig,
};
use serde_json::{json, Value};

use crate::device::{run_on, DeviceChoice, Job, Precision};

/// Flags of `nopad generate`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true)))]
pub struct GenerateArgs {
    /// HF model directory, preset name (random init) or Hub id in the local cache.
    #[arg(long)]
    pub model: String,
    /// Raw text, tokenised as HF's `tokenizer(text)` (with the tokenizer's BOS).
    #[arg(long, value_name = "TEXT", group = "input")]
    pub prompt: Option<String>,
    /// A conversation, as a JSON list of {"role", "content"} or a file holding one, rendered
    /// with the chat template and its generation prompt.
    #[arg(long, value_name = "FILE_OR_JSON", group = "input")]
    pub messages: Option<String>,
    /// Token ids, comma-separated (no tokenizer needed).
    #[arg(
        long,
        value_name = "1,2,3",
        group = "input",
        value_delimiter = ',',
        num_args = 1
    )]
    pub prompt_ids: Option<Vec<u32>>,
    /// A JSON-lines file of prompts, one {"prompt"}, {"messages"} or {"prompt_ids"} per line,
    /// decoded together as one batch.
    #[arg(long, value_name = "FILE.jsonl", group = "input")]
    pub prompts: Option<PathBuf>,
    /// Tokens generated per prompt at most (fewer when it ends on an end-of-sequence id).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the tokens that make up this much probability (after top-k).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the draws (the same seed gives the same text on the same device).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A PEFT LoRA adapter directory applied on top of --model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Under --adapter, the base's projections in bf16 or nf4 (QLoRA).
    #[arg(long = "base-dtype", value_name = "bf16|nf4", default_value = "bf16", value_parser = super::lora::parse_base)]
    pub base_dtype: nopad_model::quant::BaseDtype,
    /// Compute type on CUDA: bf16 or f32 (exact comparison with HF in fp32).
    #[arg(long, default_value = "bf16", value_parser = crate::device::parse_dtype)]
    pub dtype: nopad_backend::cuda::CudaDtype,
    /// A Jinja chat template file used instead of the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// One JSON record per prompt: prompt, prompt_ids, ids, completion, stop, tokens_per_s.
    #[arg(long)]
    pub json: bool,
}

/// `--sample-every N --sample-prompts FILE [--sample-max-new-tokens M]` of `nopad train`
/// (command line only, not config-file keys).
#[derive(Args, Clone, Debug, Default)]
pub struct SampleArgs {
    /// Every N optimizer steps (and after the last), greedy completions of --sample-prompts
    /// from the current weights, written to the --log file as {"step", "samples": [{"prompt",
    /// "completion", "ids", "stop"}]} and to stderr (not with --shard 3).
    #[arg(long, value_name = "N", requires = "sample_prompts")]
    pub sample_every: Option<u64>,
    /// The prompts of --sample-every: JSON lines, one {"prompt"}, {"messages"} or
    /// {"prompt_ids"} each (as `nopad generate --prompts`).
    #[arg(long, value_name = "FILE.jsonl", requires = "sample_every")]
    pub sample_prompts: Option<PathBuf>,
    /// Tokens generated per sample at most. Default 128.
    #[arg(long, value_name = "M", requires = "sample_every")]
    pub sample_max_new_tokens: Option<usize>,
}

impl SampleArgs {
    /// The sampling settings these flags ask for (None: no samples).
    pub fn resolve(&self) -> Result<Option<SampleConfig>> {
        let (Some(every), Some(prompts)) = (self.sample_every, &self.sample_prompts) else {
            return Ok(None);
        };
        if !prompts.is_file() {
            bail!("`sample-prompts`: {} is not a file", prompts.display());
        }
        let sc = SampleConfig {
            every,
            prompts: prompts.clone(),
            max_new_tokens: self.sample_max_new_tokens.unwrap_or(128),
        };
        sc.validate()?;
        Ok(Some(sc))
    }
}

/// The prompt of `--prompt`, `--messages` or `--prompt-ids`.
fn one_prompt(a: &GenerateArgs) -> Result<PromptInput> {
    if let Some(text) = &a.prompt {
        return Ok(PromptInput::Text(text.clone()));
    }
    if let Some(ids) = &a.prompt_ids {
        let ids = ids.iter().map(|&i| Value::from(i)).collect();
        return PromptInput::ids(&Value::Array(ids))
            .map_err(|e| anyhow::anyhow!("--prompt-ids: {e}"));
    }
    let m = a.messages.as_deref().unwrap_or_default();
    // JSON itself, or a file holding it (a list, or a record with `messages`).
    let (v, from): (Value, String) = match serde_json::from_str(m) {
        Ok(v) => (v, "--messages".into()),
        Err(_) => {
            let text = std::fs::read_to_string(m)
                .with_context(|| format!("--messages {m}: neither JSON nor a readable file"))?;
            let v = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("--messages {m}: line {}: {e}", e.line()))?;
            (v, format!("--messages {m}"))
        }
    };
    let list = v.get("messages").unwrap_or(&v);
    PromptInput::messages(list).map_err(|e| anyhow::anyhow!("{from}: {e}"))
}

struct GenerateJob<'a>(&'a GenerateArgs);

impl Job for GenerateJob<'_> {
    type Out = Vec<Value>;
    fn run<B: Backend>(self, b: &B) -> Result<Vec<Value>> {
        let a = self.0;
        let source = super::model_source(&a.model)?;
        let dir = match &source {
            ModelSource::Dir(d) => Some(d.as_path()),
            ModelSource::Preset(_) => None,
        };
        let (mut model, desc) = match &a.adapter {
            Some(ad) => build_adapter_eval_model(b, &source, 0, ad, a.base_dtype)?,
            None if a.base_dtype != nopad_model::quant::BaseDtype::Bf16 => {
                bail!("--base-dtype applies to the base under --adapter")
            }
            None => build_eval_model(b, &source, 0)?,
        };
        let tok = model_tokenizer(dir, a.chat_template.as_deref())?;
        let vocab = model.cfg.vocab_size;
        let prompts = match &a.prompts {
            Some(file) => read_prompts(file, tok.as_ref(), vocab)?,
            None => {
                let input = one_prompt(a)?;
                let ids = input
                    .to_ids(tok.as_ref(), vocab)
                    .map_err(|e| anyhow::anyhow!("the prompt: {e}"))?;
                vec![Prompt {
                    given: input.given(),
                    ids,
                }]
            }
        };
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling: Sampling {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
            },
            seed: a.seed,
            eos: eos_ids(&model.cfg, dir)?,
        };
        if !a.json {
            eprintln!("nopad: {desc} on {}", b.describe());
        }
        let ids: Vec<Vec<i32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let out = model.generate(b, &ids, &opts)?;
        prompts
            .into_iter()
            .zip(out)
            .map(|(p, g)| {
                Ok(json!({
                    "prompt": p.given,
                    "prompt_ids": p.ids,
                    "completion": completion_text(tok.as_ref(), &g.ids)?,
                    "ids": g.ids,
                    "stop": g.stop.name(),
                    "tokens_per_s": g.ids.len() as f64 / g.seconds.max(1e-9),
                }))
            })
            .collect()
    }
}

/// Runs `nopad generate`.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let records = run_on(a.device, Precision::of(a.dtype), GenerateJob(a))?;
    let several = records.len() > 1;
    for (i, r) in records.iter().enumerate() {
        if a.json {
            println!("{r}");
            continue;
        }
        if several {
            println!("=== prompt {i} ===");
        }
        match r["completion"].as_str() {
            Some(text) => println!("{text}"),
            None => println!("{}", r["ids"]),
        }
        eprintln!(
            "nopad: prompt {i}: {} tokens ({}), {:.1} tokens/s",
            r["ids"].as_array().map_or(0, Vec::len),
            r["stop"].as_str().unwrap_or_default(),
            r["tokens_per_s"].as_f64().unwrap_or_default()
        );
    }
    Ok(())
}
