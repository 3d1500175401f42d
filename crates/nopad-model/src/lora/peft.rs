//! PEFT's adapter files in and out: `adapter_model.safetensors` (tensors named as PEFT saves
//! them, `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, f32 or bf16) and
//! `adapter_config.json`.
//!
//! Reading is strict where PEFT is lenient: PEFT loads a file whose keys do not match its model
//! with only a warning and leaves every missing B at zero, which silently turns the adapter
//! off. So a key with `.default.` in it (the name of a live PEFT module, not of a saved one), a
//! key with another prefix, an unknown key, a missing tensor or a shape that disagrees with the
//! config is an error naming the file and the tensor; so is a config feature nopad does not
//! implement (DoRA, per-layer ranks, `modules_to_save`, ...), naming the field.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde_json::{json, Value};

use super::layout::PEFT_PREFIX;
use super::{AdapterLayout, LoraConfig, Target};
use crate::error::{ModelError, Result};
use crate::layout::TensorSpec;
use crate::weights::{atomic_write, encode, tensor_values, SaveDtype};

/// The adapter's weights file.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The adapter's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Writes `vals` (the adapter buffer of `layout`) and the config as PEFT saves them, each file
/// atomically. `base_model` is recorded as `base_model_name_or_path`.
pub fn save_adapter(
    dir: &Path,
    lora: &LoraConfig,
    layout: &AdapterLayout,
    dtype: SaveDtype,
    base_model: &str,
    vals: &[f32],
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let data: Vec<(&TensorSpec, Vec<u8>)> = layout
        .tensors
        .iter()
        .map(|t| (t, encode(&vals[t.range()], dtype)))
        .collect();
    let views = data.iter().map(|(t, bytes)| {
        let view = TensorView::new(st_dtype, t.shape.clone(), bytes)
            .expect("byte length matches shape and dtype");
        (t.name.clone(), view)
    });
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path = dir.join(ADAPTER_FILE);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Format {
        path: path.clone(),
        msg: format!("cannot serialise: {e}"),
    })?;
    atomic_write(&path, &bytes)?;
    let config = adapter_config(lora, base_model);
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    atomic_write(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// The `adapter_config.json` PEFT writes for `lora` on `base_model`.
pub fn adapter_config(lora: &LoraConfig, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        // The f32's shortest decimal (0.05, not 0.05000000074505806).
        "lora_dropout": lora.dropout.to_string().parse::<f64>().unwrap_or(0.0),
        "target_modules": lora.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "bias": "none",
        "use_rslora": lora.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Reads `adapter_config.json` of `dir`: the settings (with `seed` 0: the file has none) and
/// `base_model_name_or_path` if given.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: serde_json::Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: path.clone(),
            msg: format!("not a JSON object: {e}"),
        })?;
    let bad = |field: &str, msg: String| ModelError::Config {
        path: path.display().to_string(),
        field: field.into(),
        msg,
    };
    let get = |f: &str| v.get(f).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                "peft_type",
                format!("{other:?}: only LORA adapters are supported"),
            ))
        }
    }
    // Features that change the math: refused rather than ignored.
    let off = |f: &str, x: &Value| match x {
        Value::Bool(b) => !b,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => f == "bias" && s == "none",
        _ => false,
    };
    for f in [
        "use_dora",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "bias",
    ] {
        if let Some(x) = get(f).filter(|x| !off(f, x)) {
            return Err(bad(f, format!("{x} is not supported by nopad's LoRA")));
        }
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r", "missing or not a positive integer".into()))? as usize;
    let alpha = match get("lora_alpha") {
        None => 8.0,
        Some(a) => a
            .as_f64()
            .ok_or_else(|| bad("lora_alpha", format!("{a} is not a number")))?,
    };
    let dropout = get("lora_dropout").map_or(Some(0.0), Value::as_f64);
    let dropout = dropout.ok_or_else(|| bad("lora_dropout", "not a number".into()))? as f32;
    let use_rslora = get("use_rslora").map_or(Some(false), Value::as_bool);
    let use_rslora = use_rslora.ok_or_else(|| bad("use_rslora", "not a boolean".into()))?;
    let targets = match get("target_modules") {
        Some(Value::String(s)) => {
            Target::parse_list(s, &format!("{}: target_modules", path.display()))?
        }
        Some(Value::Array(a)) => {
            let names: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
            let names = names.ok_or_else(|| bad("target_modules", "not a list of names".into()))?;
            Target::parse_list(
                &names.join(","),
                &format!("{}: target_modules", path.display()),
            )?
        }
        _ => {
            return Err(bad(
                "target_modules",
                "missing: a list of module names".into(),
            ))
        }
    };
    let lora = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora,
        seed: 0,
    };
    lora.validate(&path.display().to_string())?;
    let base = get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((lora, base))
}

/// Loads `adapter_model.safetensors` of `dir` into `layout` through `sink(offset, values)`,
/// after checking every key and shape (see the module header).
pub fn load_adapter(
    dir: &Path,
    layout: &AdapterLayout,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let path = dir.join(ADAPTER_FILE);
    let bytes = crate::weights::map_file(&path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
        path: path.clone(),
        msg: format!("not a safetensors file: {e}"),
    })?;
    let by_name: HashMap<&str, &TensorSpec> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let mut seen = BTreeMap::new();
    for name in names {
        let err = |msg: String| ModelError::Tensor {
            path: path.clone(),
            tensor: name.clone(),
            msg,
        };
        if name.contains(".default.") {
            return Err(err(
                "a live PEFT module's name (`.default.`): PEFT saves keys without the adapter \
                 name, and loads this one as missing, leaving its B at zero"
                    .into(),
            ));
        }
        if !name.starts_with(PEFT_PREFIX) {
            return Err(err(format!(
                "wrong prefix: PEFT expects `{PEFT_PREFIX}N...` for a causal LM and would \
                 load this key as missing, leaving its B at zero"
            )));
        }
        let spec = by_name.get(name.as_str()).ok_or_else(|| {
            err(
                "not a tensor of this adapter (adapter_config.json: target_modules, r; the \
                 base model's num_hidden_layers)"
                    .into(),
            )
        })?;
        let view = st.tensor(&name).map_err(|e| err(e.to_string()))?;
        let hint = " from adapter_config.json's r and the base model's config.json";
        sink(spec.offset, &tensor_values(&view, &spec.shape, hint, err)?)?;
        seen.insert(name.clone(), ());
    }
    if let Some(missing) = layout.tensors.iter().find(|t| !seen.contains_key(&t.name)) {
        return Err(ModelError::Tensor {
            path,
            tensor: missing.name.clone(),
            msg: "missing from the adapter".into(),
        });
    }
    Ok(())
}
