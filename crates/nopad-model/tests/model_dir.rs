//! Model configs and directories as a user (or the Hub) hands them over: presets against the
//! sizes HF publishes, config.json parsing and its round trip, and directories that must be
//! refused with the file, key or entry named.

use std::path::Path;

use nopad_model::weights::{self, SaveDtype};
use nopad_model::{Arch, Config, Layout, RopeScaling, PRESETS};

#[test]
fn presets_parse_and_have_the_published_sizes() {
    let count = |n: &str| Layout::new(&Config::preset(n).unwrap()).total;
    for (name, _, _) in PRESETS {
        assert!(count(name) > 0, "{name}");
    }
    // Parameter counts HF reports for these models (tied embeddings counted once).
    assert_eq!(count("llama-100m"), 100_092_672);
    assert_eq!(count("llama-3.2-1b"), 1_235_814_400);
    assert_eq!(count("llama-3.1-8b"), 8_030_261_248);
    assert_eq!(count("llama-2-7b"), 6_738_415_616);
    assert_eq!(count("mistral-7b"), 7_248_023_552);
    assert_eq!(count("qwen2.5-0.5b"), 494_032_768);
    assert_eq!(count("qwen3-0.6b"), 596_049_920);
}

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

#[test]
fn qwen_preset_has_its_biases_and_no_window() {
    let q = Config::preset("qwen2.5-0.5b").unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings && q.sliding_window.is_none());
    assert_eq!(q.head_dim, 64);
}

#[test]
fn bad_fields_are_named() {
    let base = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2"#;
    let cases = [
        (
            r#","num_key_value_heads":3}"#,
            "field `num_key_value_heads`: 3 does not divide",
        ),
        (
            r#","hidden_act":"gelu"}"#,
            "field `hidden_act`: `gelu` is not supported",
        ),
        (
            r#","rope_scaling":{"rope_type":"longrope","factor":2}}"#,
            "field `rope_scaling.rope_type`: `longrope`",
        ),
        (
            r#","rope_scaling":{"rope_type":"llama3","factor":2}}"#,
            "field `rope_scaling.low_freq_factor`: missing",
        ),
        (
            r#","rms_norm_eps":"small"}"#,
            "field `rms_norm_eps`: expected a number",
        ),
    ];
    for (tail, want) in cases {
        let err = Config::from_json_str(&format!("{base}{tail}"), "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m/config.json: ") && err.contains(want),
            "{err}"
        );
    }
    let err =
        Config::from_json_str(r#"{"architectures":["GPT2LMHeadModel"]}"#, "c.json").unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported architecture \"GPT2LMHeadModel\""),
        "{err}"
    );
    let err = Config::from_json_str(
        &format!(
            "{}}}",
            base.replace("\"hidden_size\":8", "\"hidden_size\":-8")
        ),
        "c.json",
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("field `hidden_size`: expected a non-negative integer"),
        "{err}"
    );
}

#[test]
fn hf_json_roundtrips() {
    for (name, _, _) in PRESETS {
        let c = Config::preset(name).unwrap();
        let back = Config::from_json_str(&c.to_hf_json("float32").to_string(), "x").unwrap();
        assert_eq!(c, back, "{name}");
    }
    // transformers 5 layout: rope_parameters holds theta and scaling.
    let v5 = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_parameters":{"rope_type":"linear","factor":4.0,"rope_theta":123.0}}"#;
    let c = Config::from_json_str(v5, "x").unwrap();
    assert_eq!(c.rope_theta, 123.0);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    // YaRN as Qwen2.5's long-context configs write it (transformers 4 `type` key), defaults
    // filled as HF fills them, and back out; dynamic NTK too.
    let yarn = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":131072,"rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":32768}}"#;
    let c = Config::from_json_str(yarn, "x").unwrap();
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32768.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        }
    );
    let back = Config::from_json_str(&c.to_hf_json("bfloat16").to_string(), "x").unwrap();
    assert_eq!(back, c);
    let dynamic = yarn.replace(
        r#"{"type":"yarn","factor":4.0,"original_max_position_embeddings":32768}"#,
        r#"{"rope_type":"dynamic","factor":2.0}"#,
    );
    let c = Config::from_json_str(&dynamic, "x").unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
    let e = Config::from_json_str(&yarn.replace("yarn", "longrope"), "x").unwrap_err();
    assert!(e.to_string().contains("`longrope` is not supported"), "{e}");
}

/// A Qwen3 `config.json` as transformers 5 writes it (`rope_parameters`, `layer_types`), with
/// heads wider than the residual stream (4 × 32 over 48): read with its q/k norms, its biases and
/// window read as HF reads them; a checkpoint of it round-trips with `q_norm`/`k_norm` under
/// HF's names.
#[test]
fn a_qwen3_directory_reads_with_its_qk_norms_and_round_trips() {
    let hf = r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "head_dim": 32, "hidden_act": "silu", "hidden_size": 48,
        "initializer_range": 0.02, "intermediate_size": 64,
        "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 40960,
        "max_window_layers": 28, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": null, "tie_word_embeddings": true, "dtype": "bfloat16",
        "transformers_version": "5.0.0", "use_cache": true, "use_sliding_window": false,
        "vocab_size": 100}"#;
    let c = Config::from_json_str(hf, "config.json").unwrap();
    assert_eq!((c.arch, c.head_dim, c.rope_theta), (Arch::Qwen3, 32, 1e6));
    assert!(c.qk_norm && !c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert_eq!(c.sliding_window, None);
    let with = |from: &str, to: &str| Config::from_json_str(&hf.replace(from, to), "c").unwrap();
    let biased = with(r#""attention_bias": false"#, r#""attention_bias": true"#);
    assert!(
        biased.qkv_bias && biased.o_bias,
        "attention_bias: q, k, v and o"
    );
    assert_eq!(
        with(r#""head_dim": 32,"#, "").head_dim,
        128,
        "Qwen3Config's default"
    );
    let windowed = with(
        r#""use_sliding_window": false"#,
        r#""use_sliding_window": true"#,
    );
    assert_eq!(windowed.sliding_window, None, "a null window");
    let windowed = Config::from_json_str(
        &hf.replace(
            r#""use_sliding_window": false"#,
            r#""use_sliding_window": true"#,
        )
        .replace(r#""sliding_window": null"#, r#""sliding_window": 4096"#),
        "c",
    )
    .unwrap();
    assert_eq!(windowed.sliding_window, Some(4096));
    let layout = Layout::new(&c);
    let shape = |name: &str| {
        let t = layout.tensors.iter().find(|t| t.name == name);
        t.map(|t| t.shape.clone())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    for l in 0..2 {
        let at = |s: &str| format!("model.layers.{l}.self_attn.{s}");
        assert_eq!(shape(&at("q_norm.weight")), [32]);
        assert_eq!(shape(&at("k_norm.weight")), [32]);
        assert_eq!(shape(&at("q_proj.weight")), [128, 48]);
        assert_eq!(shape(&at("o_proj.weight")), [48, 128]);
    }
    // Every element a different value: a tensor loaded at another's place shows.
    let dir = tempfile::tempdir().unwrap();
    weights::save_checkpoint(dir.path(), &c, &layout, SaveDtype::F32, usize::MAX, |r| {
        Ok(r.map(|i| i as f32).collect())
    })
    .unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = file.names();
    for n in ["q_norm", "k_norm"].map(|n| format!("model.layers.1.self_attn.{n}.weight")) {
        assert!(names.contains(&n.as_str()), "{n} not in the file");
    }
    let back = weights::read_config(dir.path()).unwrap();
    assert_eq!(back, c);
    let mut got = vec![f32::NAN; layout.total];
    weights::load_checkpoint(dir.path(), &back, &Layout::new(&back), |off, v| {
        got[off..off + v.len()].copy_from_slice(v);
        Ok(())
    })
    .unwrap();
    assert!(got.iter().enumerate().all(|(i, &v)| v == i as f32));
}
