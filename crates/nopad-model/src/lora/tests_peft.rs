//! PEFT files and merging: an adapter survives a write and read (f32 exactly, bf16 rounded),
//! the config round-trips, files PEFT would load with B silently zero are refused naming the
//! file and key, and evaluating base + adapter equals evaluating the merged model (f64).

use std::collections::HashMap;
use std::path::Path;

use nopad_backend::cpu::Cpu;
use nopad_rng::Rng;
use safetensors::{tensor::TensorView, Dtype};

use super::tests::{lora_cfg, lora_model};
use super::{load_adapter, merge, read_adapter_config, save_adapter, AdapterLayout, Target};
use crate::tests::{examples, flatten, init_base, tiny};
use crate::weights::SaveDtype;
use crate::Model;

#[test]
fn evaluating_base_plus_adapter_equals_evaluating_the_merged_model() {
    for (tied, bias, rslora) in [(false, true, false), (true, false, true)] {
        let b = Cpu::<f64>::new();
        let cfg = tiny(tied, bias);
        let mut lora = lora_cfg(
            3,
            0.2,
            &[Target::Q, Target::V, Target::O, Target::Gate, Target::Down],
        );
        lora.use_rslora = rslora;
        let mut m = lora_model(&b, cfg.clone(), lora.clone(), 21, true);
        let p = flatten(&examples(&mut Rng::new(22), &[7, 4, 9], cfg.vocab_size));
        m.forward_eval(&b, &p.inputs()).unwrap();
        let la = m.take_loss_sum(&b).unwrap();
        let mut merged = Model::new_eval(&b, cfg.clone()).unwrap();
        init_base(&b, &mut merged, cfg.clone(), 21);
        let alayout = m.adapter_layout().unwrap().clone();
        let vals = m.trainable_mut().to_vec();
        let layout = merged.layout.clone();
        merge(&layout, &lora, &alayout, &vals, &mut merged.params);
        merged.forward_eval(&b, &p.inputs()).unwrap();
        let lm = merged.take_loss_sum(&b).unwrap();
        // Without the adapter the loss is clearly another.
        let mut base = Model::new_eval(&b, cfg.clone()).unwrap();
        init_base(&b, &mut base, cfg, 21);
        base.forward_eval(&b, &p.inputs()).unwrap();
        let lb = base.take_loss_sum(&b).unwrap();
        assert!(
            ((la - lm) / la).abs() < 1e-12,
            "tied {tied}: adapter {la} merged {lm}"
        );
        assert!(
            ((la - lb) / la).abs() > 1e-4,
            "the adapter changes nothing: {la} vs {lb}"
        );
    }
}

fn saved(dtype: SaveDtype) -> (tempfile::TempDir, AdapterLayout, Vec<f32>) {
    let b = Cpu::<f32>::new();
    let lora = lora_cfg(2, 0.05, &[Target::K, Target::Up]);
    let m = lora_model(&b, tiny(false, false), lora.clone(), 31, true);
    let layout = m.adapter_layout().unwrap().clone();
    let vals = m.read_adapter(&b).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(dir.path(), &lora, &layout, dtype, "some/base", &vals).unwrap();
    (dir, layout, vals)
}

fn load(dir: &Path, layout: &AdapterLayout) -> crate::Result<Vec<f32>> {
    let mut got = vec![f32::NAN; layout.total];
    load_adapter(dir, layout, |off, v| {
        got[off..off + v.len()].copy_from_slice(v);
        Ok(())
    })?;
    Ok(got)
}

#[test]
fn adapters_and_their_config_round_trip_in_pefts_format() {
    let (dir, layout, vals) = saved(SaveDtype::F32);
    assert_eq!(load(dir.path(), &layout).unwrap(), vals);
    let (lora, base) = read_adapter_config(dir.path()).unwrap();
    assert_eq!(
        lora,
        super::LoraConfig {
            seed: 0,
            ..lora_cfg(2, 0.05, &[Target::K, Target::Up])
        }
    );
    assert_eq!(base.as_deref(), Some("some/base"));
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["task_type"], "CAUSAL_LM");
    assert_eq!(v["bias"], "none");
    assert_eq!(
        v["target_modules"],
        serde_json::json!(["k_proj", "up_proj"])
    );
    // bf16: each value rounded once.
    let (dir, layout, vals) = saved(SaveDtype::Bf16);
    let got = load(dir.path(), &layout).unwrap();
    for (g, v) in got.iter().zip(&vals) {
        assert_eq!(*g, half::bf16::from_f32(*v).to_f32());
    }
}

/// Rewrites the adapter file with `rename` applied to each key, the last tensor left out with
/// `drop_last`, and one more column in the tensor whose name contains `widen`.
fn tamper(
    dir: &Path,
    layout: &AdapterLayout,
    rename: fn(&str) -> String,
    drop_last: bool,
    widen: Option<&str>,
) {
    let mut tensors = layout.tensors.clone();
    if drop_last {
        tensors.pop();
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let mut shape = t.shape.clone();
            if widen.is_some_and(|w| t.name.contains(w)) {
                shape[1] += 1;
            }
            let n: usize = shape.iter().product();
            (rename(&t.name), shape, vec![0u8; 4 * n])
        })
        .collect();
    let views = data.iter().map(|(n, s, d)| {
        (
            n.clone(),
            TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
        )
    });
    let bytes = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
}

#[test]
fn files_peft_would_load_with_b_at_zero_are_refused_naming_file_and_key() {
    let (dir, layout, _) = saved(SaveDtype::F32);
    type Rename = fn(&str) -> String;
    let cases: [(&str, Rename, bool, Option<&str>); 5] = [
        (
            ".default.",
            |n| n.replace("lora_A.weight", "lora_A.default.weight"),
            false,
            None,
        ),
        (
            "wrong prefix",
            |n| n.replace("base_model.model.model.", "model."),
            false,
            None,
        ),
        (
            "not a tensor of this adapter",
            |n| n.replace("k_proj", "q_proj"),
            false,
            None,
        ),
        ("missing", str::to_string, true, None),
        (
            "shape [",
            str::to_string,
            false,
            Some("layers.1.mlp.up_proj.lora_B"),
        ),
    ];
    for (want, rename, drop_last, widen) in cases {
        tamper(dir.path(), &layout, rename, drop_last, widen);
        let e = load(dir.path(), &layout).unwrap_err().to_string();
        assert!(
            e.contains("adapter_model.safetensors") && e.contains("lora_") && e.contains(want),
            "{want}: {e}"
        );
    }
    // Config features nopad does not implement are refused naming the field.
    let cfg_path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    for (field, from, to) in [
        ("use_dora", "\"use_dora\": false", "\"use_dora\": true"),
        (
            "peft_type",
            "\"peft_type\": \"LORA\"",
            "\"peft_type\": \"IA3\"",
        ),
        (
            "rank_pattern",
            "\"rank_pattern\": {}",
            "\"rank_pattern\": {\"q_proj\": 4}",
        ),
        ("target_modules", "\"k_proj\"", "\"qkv\""),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(&cfg_path, text.replace(from, to)).unwrap();
        let e = read_adapter_config(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(field),
            "{field}: {e}"
        );
    }
}
