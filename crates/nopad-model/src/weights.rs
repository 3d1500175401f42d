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
    pub(crate) fn torch_name(self) -> &'static str {
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

/// Reads `config.json` of a model directory. Its sizes are bounded by [`Config`]'s checks, and
/// where the directory holds weights they are checked against the safetensors headers
/// ([`check_checkpoint`]), so a damaged or hostile config fails here, naming the key, before a
/// caller allocates anything from it.
pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let cfg = Config::from_json_str(&text, &path.display().to_string())?;
    if has_checkpoint(dir) {
        check_checkpoint(dir, &cfg, &Layout::new(&cfg))?;
    }
    Ok(cfg)
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

/// The safetensors files of a model directory: the files `model.safetensors.index.json` names,
/// else `model.safetensors`. The index is untrusted: an entry naming a file outside `dir` (an
/// absolute path, `..`, or a symlink that leaves the directory) is refused, naming the entry.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Ok(vec![dir.join("model.safetensors")]);
    }
    let format = |msg: String| ModelError::Format {
        path: index.clone(),
        msg,
    };
    let text = fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| format("no `weight_map` object".into()))?;
    let root = dir.canonicalize().map_err(|e| ModelError::io(dir, e))?;
    let mut files: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let entry = |why: &str| format(format!("weight_map entry `{tensor}`: {file} {why}"));
        let name = file
            .as_str()
            .ok_or_else(|| entry("is not a file name (expected a string)"))?;
        let plain = !name.is_empty()
            && Path::new(name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(entry(
                "is not a file inside the model directory (absolute paths and `..` are refused)",
            ));
        }
        // A symlink may point anywhere: what counts is where the file really is.
        if let Ok(real) = dir.join(name).canonicalize() {
            if !real.starts_with(&root) {
                return Err(entry(&format!(
                    "leaves the model directory (it resolves to {})",
                    real.display()
                )));
            }
        }
        files.push(name);
    }
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The config keys that set a tensor's shape, for messages about a checkpoint that disagrees
/// with its `config.json`.
fn shape_keys(name: &str) -> &'static str {
    let ends = |s: &str| name.ends_with(s);
    if ends("embed_tokens.weight") || name == "lm_head.weight" {
        "vocab_size, hidden_size"
    } else if ends("q_proj.weight") || ends("q_proj.bias") || ends("o_proj.weight") {
        "num_attention_heads, head_dim, hidden_size"
    } else if ends("k_proj.weight")
        || ends("v_proj.weight")
        || ends("k_proj.bias")
        || ends("v_proj.bias")
    {
        "num_key_value_heads, head_dim, hidden_size"
    } else if ends("mlp.gate_proj.weight")
        || ends("mlp.up_proj.weight")
        || ends("mlp.down_proj.weight")
    {
        "intermediate_size, hidden_size"
    } else {
        "hidden_size"
    }
}

/// One tensor as a safetensors header describes it.
struct HeaderEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
}

/// Largest safetensors header read (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads the header of a safetensors file, not its data: 8 bytes of length, then JSON.
fn read_header(file: &Path) -> Result<Vec<HeaderEntry>> {
    use std::io::Read;
    let bad = |msg: String| ModelError::Format {
        path: file.to_path_buf(),
        msg: format!("not a safetensors file: {msg}"),
    };
    let mut f = fs::File::open(file).map_err(|e| ModelError::io(file, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header of {n} bytes (at most {MAX_HEADER_BYTES})"
        )));
    }
    let mut text = Vec::new();
    f.take(n)
        .read_to_end(&mut text)
        .map_err(|e| ModelError::io(file, e))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(Value::as_str);
        let shape: Option<Vec<usize>> = info.get("shape").and_then(Value::as_array).and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        match (dtype, shape) {
            (Some(dtype), Some(shape)) => out.push(HeaderEntry {
                name,
                dtype: dtype.to_string(),
                shape,
            }),
            _ => return Err(bad(format!("tensor `{name}` has no valid dtype and shape"))),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Checks a model directory's checkpoint against `cfg` from the safetensors headers alone,
/// before anything is allocated: every tensor expected and of the right shape, of a supported
/// dtype, none twice, none missing. A shape that disagrees names the config keys that set it.
pub fn check_checkpoint(dir: &Path, cfg: &Config, layout: &Layout) -> Result<()> {
    let by_name: HashMap<&str, &TensorSpec> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in weight_files(dir)? {
        for t in read_header(&file)? {
            let err = |msg: String| ModelError::Tensor {
                path: file.clone(),
                tensor: t.name.clone(),
                msg,
            };
            if ignorable(&t.name, cfg) {
                continue;
            }
            let spec = by_name.get(t.name.as_str()).ok_or_else(|| {
                err(format!(
                    "unexpected tensor: a {} with this config has no such parameter",
                    cfg.arch.hf_name()
                ))
            })?;
            if let Some(prev) = seen.insert(t.name.clone(), file.clone()) {
                return Err(err(format!("appears twice (also in {})", prev.display())));
            }
            if t.shape != spec.shape {
                return Err(err(format!(
                    "shape {:?}, expected {:?} from config.json ({})",
                    t.shape,
                    spec.shape,
                    shape_keys(&t.name)
                )));
            }
            if !matches!(t.dtype.as_str(), "F32" | "BF16" | "F16") {
                return Err(err(format!(
                    "dtype {} is not supported (f32, bf16, f16)",
                    t.dtype
                )));
            }
        }
    }
    if let Some(missing) = layout.tensors.iter().find(|t| !seen.contains_key(&t.name)) {
        return Err(ModelError::Tensor {
            path: dir.to_path_buf(),
            tensor: missing.name.clone(),
            msg: "missing from the checkpoint (config.json: num_hidden_layers, \
                  tie_word_embeddings, attention_bias)"
                .into(),
        });
    }
    Ok(())
}

/// Whether `dir` holds weights (a safetensors index or `model.safetensors`).
pub fn has_checkpoint(dir: &Path) -> bool {
    dir.join("model.safetensors.index.json").exists() || dir.join("model.safetensors").exists()
}

/// Loads the tensors of an HF model directory into the layout, through `sink(offset, values)`.
/// The headers are checked first ([`check_checkpoint`]), so a missing, unexpected or mis-shaped
/// tensor, or an unsupported dtype, is an error naming it before any value is read.
pub fn load_checkpoint(
    dir: &Path,
    cfg: &Config,
    layout: &Layout,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    check_checkpoint(dir, cfg, layout)?;
    let by_name: HashMap<&str, &TensorSpec> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for file in weight_files(dir)? {
        let bytes = map_file(&file)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
            path: file.clone(),
            msg: format!("not a safetensors file: {e}"),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            let Some(spec) = by_name
                .get(name.as_str())
                .filter(|_| !ignorable(&name, cfg))
            else {
                continue;
            };
            let err = |msg: String| ModelError::Tensor {
                path: file.clone(),
                tensor: name.clone(),
                msg,
            };
            let view = st.tensor(&name).map_err(|e| err(e.to_string()))?;
            // The header was checked, but the file may have changed since: check again.
            sink(spec.offset, &tensor_values(&view, &spec.shape, "", err)?)?;
        }
    }
    Ok(())
}

/// The bytes of a weight file, memory-mapped: a shard is read from the page cache as its
/// tensors are converted, never copied whole into the process (an 8B checkpoint's 5 GB shards
/// would otherwise each be one more 5 GB allocation at load time).
///
/// The map is read-only and private. Its one hazard is the file being truncated by another
/// process while it is read (a SIGBUS), the hazard of every loader that maps safetensors, HF's
/// included; replacing the file (a new inode) does not affect the map.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: read-only private map of a regular file; see above for truncation.
    unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(|e| ModelError::io(path, e))
}

/// A stored tensor's values as f32, after checking its shape against `want` (`hint`: where that
/// shape comes from) and its dtype; `err` names the file and the tensor.
pub(crate) fn tensor_values(
    view: &safetensors::tensor::TensorView<'_>,
    want: &[usize],
    hint: &str,
    err: impl Fn(String) -> ModelError,
) -> Result<Vec<f32>> {
    if view.shape() != want {
        let got = view.shape();
        return Err(err(format!("shape {got:?}, expected {want:?}{hint}")));
    }
    to_f32(view.dtype(), view.data()).ok_or_else(|| {
        err(format!(
            "dtype {:?} is not supported (f32, bf16, f16)",
            view.dtype()
        ))
    })
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

pub(crate) fn encode(vals: &[f32], dtype: SaveDtype) -> Vec<u8> {
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
