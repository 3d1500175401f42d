//! Parameter values in and out: random initialisation, and Hugging Face checkpoints
//! (`config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`) read in
//! f32/bf16/f16 and written so that HF Transformers loads them as they are.
//!
//! Both directions stream one tensor at a time through a callback (`offset`, values), so a model
//! is never held twice in host memory on its way to or from a device.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layout::{Layout, TensorSpec};
use nopad_rng::Rng;

/// Element type of a saved checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit floats (exact for the CPU backend and for fp32 master weights).
    F32,
    /// bfloat16 (half the size; how most HF checkpoints ship).
    Bf16,
}

impl SaveDtype {
    fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            _ => Err(format!("unknown dtype `{s}` (expected f32 or bf16)")),
        }
    }
}

/// Fills every parameter as HF initialises a fresh Llama: weights ~ N(0, initializer_range²),
/// norms = 1, biases = 0. Each tensor draws from its own stream derived from `seed` and its
/// name, so the values do not depend on the order or the thread count.
pub fn init_random(
    cfg: &Config,
    layout: &Layout,
    seed: u64,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let std = cfg.initializer_range;
    let norms = layout.norm_ranges();
    const CHUNK: usize = 1 << 16;
    for t in &layout.tensors {
        let r = t.range();
        let vals: Vec<f32> = if norms.contains(&r) {
            vec![1.0; t.len()]
        } else if t.shape.len() == 1 {
            vec![0.0; t.len()]
        } else {
            let mut v = vec![0.0f32; t.len()];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                let mut rng = Rng::derived(seed, &format!("init {} {i}", t.name));
                c.iter_mut().for_each(|x| *x = (rng.normal() * std) as f32);
            });
            v
        };
        sink(t.offset, &vals)?;
    }
    Ok(())
}

/// Reads `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    Config::from_json_str(&text, &path.display().to_string())
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let c2 = |b: &[u8]| [b[0], b[1]];
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes(c2(b)).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes(c2(b)).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Tensors a checkpoint may carry that nopad does not need.
fn ignorable(name: &str, cfg: &Config) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Loads the tensors of an HF model directory into the layout, through `sink(offset, values)`.
/// A missing, unexpected or mis-shaped tensor, or an unsupported dtype, is an error naming it.
pub fn load_checkpoint(
    dir: &Path,
    cfg: &Config,
    layout: &Layout,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: index.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Format {
                path: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let by_name: HashMap<&str, &TensorSpec> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in &files {
        let bytes = fs::read(file).map_err(|e| ModelError::io(file, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
            path: file.clone(),
            msg: format!("not a safetensors file: {e}"),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            let err = |msg: String| ModelError::Tensor {
                path: file.clone(),
                tensor: name.clone(),
                msg,
            };
            if ignorable(&name, cfg) {
                continue;
            }
            let spec = by_name.get(name.as_str()).ok_or_else(|| {
                err(format!(
                    "unexpected tensor: a {} with this config has no such parameter",
                    cfg.arch.hf_name()
                ))
            })?;
            if let Some(prev) = seen.insert(name.clone(), file.clone()) {
                return Err(err(format!("appears twice (also in {})", prev.display())));
            }
            let view = st.tensor(&name).map_err(|e| err(e.to_string()))?;
            if view.shape() != spec.shape.as_slice() {
                return Err(err(format!(
                    "shape {:?}, expected {:?}",
                    view.shape(),
                    spec.shape
                )));
            }
            let vals = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                err(format!(
                    "dtype {:?} is not supported (f32, bf16, f16)",
                    view.dtype()
                ))
            })?;
            sink(spec.offset, &vals)?;
        }
    }
    if let Some(missing) = layout.tensors.iter().find(|t| !seen.contains_key(&t.name)) {
        return Err(ModelError::Tensor {
            path: dir.to_path_buf(),
            tensor: missing.name.clone(),
            msg: "missing from the checkpoint".into(),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ModelError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn encode(vals: &[f32], dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        SaveDtype::Bf16 => vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Saves a checkpoint HF Transformers loads: `config.json` and `model.safetensors` (or shards of at
/// most `max_shard_bytes` plus `model.safetensors.index.json`). `fetch(range)` returns the
/// values of one tensor. Every file is written atomically.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &Config,
    layout: &Layout,
    dtype: SaveDtype,
    max_shard_bytes: usize,
    mut fetch: impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>>,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let elem = match dtype {
        SaveDtype::F32 => 4,
        SaveDtype::Bf16 => 2,
    };
    // Group tensors into shards in checkpoint order.
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for t in &layout.tensors {
        let b = t.len() * elem;
        if size > 0 && size + b > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("shards starts non-empty").push(t);
        size += b;
    }
    let n = shards.len();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let mut weight_map = serde_json::Map::new();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for t in shard {
            data.push((
                t.name.clone(),
                encode(&fetch(t.range())?, dtype),
                t.shape.clone(),
            ));
            weight_map.insert(t.name.clone(), json!(fname));
        }
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(name, bytes, shape)| {
                let view = TensorView::new(st_dtype, shape.clone(), bytes)
                    .expect("byte length matches shape and dtype");
                (name.clone(), view)
            })
            .collect();
        let path = dir.join(&fname);
        let bytes =
            safetensors::serialize(views, Some(meta.clone())).map_err(|e| ModelError::Format {
                path: path.clone(),
                msg: format!("cannot serialise: {e}"),
            })?;
        atomic_write(&path, &bytes)?;
    }
    if n > 1 {
        let total: usize = layout.tensors.iter().map(|t| t.len() * elem).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        atomic_write(
            &dir.join("model.safetensors.index.json"),
            index.to_string().as_bytes(),
        )?;
    } else {
        let stale = dir.join("model.safetensors.index.json");
        if stale.exists() {
            fs::remove_file(&stale).map_err(|e| ModelError::io(&stale, e))?;
        }
    }
    let config = serde_json::to_string_pretty(&cfg.to_hf_json(dtype.torch_name()))
        .expect("JSON values serialise");
    atomic_write(&dir.join("config.json"), config.as_bytes())
}

/// Files of a model directory that describe its tokenizer and generation settings, copied next to
/// saved weights so the output directory is a complete model (HF loads it, nopad trains on text
/// with it).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// Copies the [`TOKENIZER_FILES`] that exist in `from` into `to` (atomically, file by file).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let bytes = fs::read(&src).map_err(|e| ModelError::io(&src, e))?;
            atomic_write(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}
