//! Model directories as a user (or the Hub) hands them over: presets against the sizes HF
//! publishes, and directories that must be refused with the file, key or entry named.

use nopad_model::{Config, Layout, PRESETS};

#[test]
fn presets_parse_and_have_the_published_sizes() {
    let count = |n: &str| Layout::new(&Config::preset(n).unwrap()).total;
    for (name, _, _) in PRESETS {
        assert!(count(name) > 0, "{name}");
    }
    // Parameter counts HF reports for these models (tied embeddings counted once).
    assert_eq!(count("llama-3.2-1b"), 1_235_814_400);
    assert_eq!(count("llama-3.1-8b"), 8_030_261_248);
    assert_eq!(count("llama-2-7b"), 6_738_415_616);
    assert_eq!(count("mistral-7b"), 7_248_023_552);
    assert_eq!(count("qwen2.5-0.5b"), 494_032_768);
}

use std::path::Path;

use nopad_model::weights::{self, SaveDtype};

/// The `tiny` preset's config.json text with `key` set to `value`.
fn tiny_with(key: &str, value: serde_json::Value) -> String {
    let text = PRESETS.iter().find(|(n, _, _)| *n == "tiny").unwrap().2;
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    v[key] = value;
    v.to_string()
}

fn config_err(key: &str, value: serde_json::Value) -> String {
    match Config::from_json_str(&tiny_with(key, value.clone()), "config.json") {
        Ok(_) => panic!("{key} = {value} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absurd_sizes_are_refused_naming_the_key() {
    for (key, value) in [
        ("hidden_size", 1_000_000_000u64),
        ("num_hidden_layers", 1_000_000),
        ("vocab_size", 1_000_000_000_000),
        ("intermediate_size", 1 << 40),
        ("num_attention_heads", 1 << 20),
        ("num_key_value_heads", 1 << 20),
        ("head_dim", 1 << 20),
        ("max_position_embeddings", u64::MAX),
    ] {
        let err = config_err(key, value.into());
        assert!(
            err.contains(&format!("field `{key}`")) && err.contains("larger than nopad accepts"),
            "{key}: {err}"
        );
    }
    // A float where a size belongs is named too.
    let err = config_err("hidden_size", serde_json::json!(1e9));
    assert!(
        err.contains("field `hidden_size`: expected a non-negative integer"),
        "{err}"
    );
}

#[test]
fn a_model_over_the_parameter_bound_is_refused() {
    // Each size within its own bound; together about 2^51 parameters.
    let text = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":1000,"hidden_size":131072,
        "intermediate_size":1048576,"num_hidden_layers":4096,"num_attention_heads":1024}"#;
    let err = Config::from_json_str(text, "config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("field `num_hidden_layers`") && err.contains("more than nopad accepts"),
        "{err}"
    );
    // The largest published shapes stay well inside.
    assert!(Config::preset("llama-3.1-8b").is_some());
}

/// Saves the `tiny` preset with random weights into `dir` (sharded when `sharded`).
fn save_tiny(dir: &Path, sharded: bool) -> Config {
    let cfg = Config::preset("tiny").unwrap();
    let layout = Layout::new(&cfg);
    let shard = if sharded { 4096 } else { usize::MAX };
    weights::save_checkpoint(dir, &cfg, &layout, SaveDtype::F32, shard, |r| {
        Ok(vec![0.5; r.len()])
    })
    .unwrap();
    cfg
}

fn load_err(dir: &Path) -> String {
    let cfg = Config::preset("tiny").unwrap();
    let layout = Layout::new(&cfg);
    let read = weights::read_config(dir)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let load = weights::load_checkpoint(dir, &cfg, &layout, |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert_eq!(read, load, "read_config and load_checkpoint disagree");
    read
}

/// Points the index's entry for `tensor` at `file`.
fn retarget(dir: &Path, tensor: &str, file: &str) {
    let path = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["weight_map"][tensor] = file.into();
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn an_index_naming_a_file_outside_the_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let dir = tmp.path().join("model");
    save_tiny(&dir, true);
    let n = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(
        n >= 2,
        "the test needs a sharded checkpoint, got {n} shards"
    );
    let shard_name = |i: usize| format!("model-{i:05}-of-{n:05}.safetensors");
    std::fs::copy(dir.join(shard_name(1)), outside.join("x.safetensors")).unwrap();
    let key = "model.embed_tokens.weight";
    let abs = outside.join("x.safetensors").display().to_string();
    for target in [
        "../outside/x.safetensors",
        abs.as_str(),
        "sub/../../outside/x.safetensors",
    ] {
        let d = tmp.path().join("m1");
        let _ = std::fs::remove_dir_all(&d);
        save_tiny(&d, true);
        retarget(&d, key, target);
        let err = load_err(&d);
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains(&format!("weight_map entry `{key}`"))
                && err.contains("not a file inside the model directory"),
            "{target}: {err}"
        );
    }
    // A symlink inside the directory that leaves it.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.join("x.safetensors"), dir.join("link.safetensors"))
            .unwrap();
        retarget(&dir, key, "link.safetensors");
        let err = load_err(&dir);
        assert!(
            err.contains(&format!("weight_map entry `{key}`"))
                && err.contains("leaves the model directory"),
            "{err}"
        );
    }
    // A symlink that stays inside is a file like any other.
    #[cfg(unix)]
    {
        let d = tmp.path().join("m2");
        save_tiny(&d, true);
        std::fs::rename(d.join(shard_name(1)), d.join("real.safetensors")).unwrap();
        std::os::unix::fs::symlink("real.safetensors", d.join(shard_name(1))).unwrap();
        weights::read_config(&d).unwrap();
    }
}

#[test]
fn config_sizes_are_checked_against_the_headers_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_tiny(&dir, false);
    // Sizes within bounds but not those of the weights: named, from the headers alone.
    for (key, value, want) in [
        (
            "vocab_size",
            1_000_000,
            ["tensor `", "vocab_size, hidden_size"],
        ),
        (
            "num_hidden_layers",
            3,
            ["model.layers.2.", "num_hidden_layers"],
        ),
    ] {
        std::fs::write(dir.join("config.json"), tiny_with(key, value.into())).unwrap();
        let err = weights::read_config(&dir).unwrap_err().to_string();
        assert!(want.iter().all(|w| err.contains(w)), "{key}: {err}");
    }
    // A header claiming an absurd length is refused without reading it.
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&st, bytes).unwrap();
    std::fs::write(dir.join("config.json"), tiny_with("vocab_size", 97.into())).unwrap();
    let err = weights::read_config(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors: not a safetensors file: header of"),
        "{err}"
    );
}
