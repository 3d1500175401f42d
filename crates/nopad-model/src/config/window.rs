//! Which decoder layers attend within a sliding window, decided as HF Transformers 5 decides it:
//! the `sliding_window` an architecture's config class keeps (with its default when the key is
//! absent), `layer_types` when `config.json` gives it (validated, and written back on export),
//! else the architecture's rule: Mistral slides in every layer, Qwen2 in the layers from
//! `max_window_layers` on, and only with `use_sliding_window`. A config HF would run differently
//! from what its `layer_types` says is refused naming the field, never silently reinterpreted.

use serde_json::{Map, Value};

use super::{Arch, Config, Reader};
use crate::error::Result;

/// The attention of one decoder layer: an entry of HF's `layer_types`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// `"full_attention"`: causal attention over the whole document.
    Full,
    /// `"sliding_attention"`: causal attention within `Config::sliding_window`.
    Sliding,
}

impl LayerType {
    /// The name in `layer_types`.
    pub fn hf_name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// What an architecture's HF config class does with the window keys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// No window at all (`LlamaConfig`); `layer_types` is ignored by HF.
    NoWindow,
    /// `sliding_window` (default 4096 when absent, `null` for none) applies to every layer
    /// (`MistralConfig`); `layer_types` is ignored by HF.
    EveryLayer,
    /// `sliding_window` (default 4096) only when `use_sliding_window` is true; `layer_types`
    /// decides, else the layers from `max_window_layers` (default 28) on slide (`Qwen2Config`,
    /// whose keys `Qwen3Config` shares).
    MaxWindowLayers,
}

fn rule(arch: Arch) -> Rule {
    match arch {
        Arch::Llama => Rule::NoWindow,
        Arch::Mistral => Rule::EveryLayer,
        Arch::Qwen2 | Arch::Qwen3 => Rule::MaxWindowLayers,
    }
}

/// `sliding_window` when the key is absent (`MistralConfig`, `Qwen2Config`).
const DEFAULT_SLIDING_WINDOW: usize = 4096;
/// `max_window_layers` when the key is absent (`Qwen2Config`).
const DEFAULT_MAX_WINDOW_LAYERS: usize = 28;

/// `(sliding_window, layer_types)` of a `config.json` with `layers` decoder layers: the window as
/// HF keeps it, and the layer types as given or (Qwen2) as HF derives them.
pub(super) fn read(
    r: &Reader<'_>,
    arch: Arch,
    layers: usize,
) -> Result<(Option<usize>, Option<Vec<LayerType>>)> {
    let key = || match r.obj.get("sliding_window") {
        None => Ok(Some(DEFAULT_SLIDING_WINDOW)),
        Some(_) => r.usize_opt("sliding_window"),
    };
    let rule = rule(arch);
    let window = match rule {
        Rule::NoWindow => None,
        Rule::EveryLayer => key()?,
        Rule::MaxWindowLayers if r.bool_opt("use_sliding_window")?.unwrap_or(false) => key()?,
        Rule::MaxWindowLayers => None,
    };
    if window == Some(0) {
        return Err(r.err(
            "sliding_window",
            "0: a query always sees itself, so a window holds at least 1 key",
        ));
    }
    let given = given_layer_types(r, layers)?;
    let types = match (rule, given) {
        (Rule::MaxWindowLayers, None) => {
            let first = r
                .usize_opt("max_window_layers")?
                .unwrap_or(DEFAULT_MAX_WINDOW_LAYERS);
            let slides = |i: usize| window.is_some() && i >= first;
            Some((0..layers).map(|i| layer_type(slides(i))).collect())
        }
        (_, given) => given,
    };
    if let Some(types) = &types {
        check_against_rule(r, arch, rule, window, types)?;
    }
    Ok((window, types))
}

fn layer_type(slides: bool) -> LayerType {
    if slides {
        LayerType::Sliding
    } else {
        LayerType::Full
    }
}

/// `layer_types` as written: one known name per layer.
fn given_layer_types(r: &Reader<'_>, layers: usize) -> Result<Option<Vec<LayerType>>> {
    let Some(v) = r.present("layer_types") else {
        return Ok(None);
    };
    let Some(list) = v.as_array() else {
        return Err(r.err(
            "layer_types",
            format!("expected a list of layer types, found {v}"),
        ));
    };
    if list.len() != layers {
        return Err(r.err(
            "layer_types",
            format!(
                "{} entries for num_hidden_layers = {layers} (one per layer)",
                list.len()
            ),
        ));
    }
    let parse = |(i, v): (usize, &Value)| match v.as_str() {
        Some("full_attention") => Ok(LayerType::Full),
        Some("sliding_attention") => Ok(LayerType::Sliding),
        _ => Err(r.err(
            &format!("layer_types[{i}]"),
            format!("{v} is not supported (full_attention or sliding_attention)"),
        )),
    };
    list.iter()
        .enumerate()
        .map(parse)
        .collect::<Result<_>>()
        .map(Some)
}

/// Refuses `layer_types` that HF would not run as written.
fn check_against_rule(
    r: &Reader<'_>,
    arch: Arch,
    rule: Rule,
    window: Option<usize>,
    types: &[LayerType],
) -> Result<()> {
    let sliding = types.iter().position(|&t| t == LayerType::Sliding);
    match (rule, sliding) {
        // HF builds the sliding mask from `sliding_window` and raises when it is unset.
        (Rule::MaxWindowLayers, Some(i)) if window.is_none() => Err(r.err(
            "layer_types",
            format!(
                "layer {i} is sliding_attention but no sliding_window applies \
                 (use_sliding_window is false or sliding_window is null)"
            ),
        )),
        (Rule::MaxWindowLayers, _) => Ok(()),
        // HF ignores layer_types here: every layer gets the same attention.
        (Rule::NoWindow | Rule::EveryLayer, _) => {
            let every = layer_type(window.is_some());
            match types.iter().position(|&t| t != every) {
                None => Ok(()),
                Some(i) => Err(r.err(
                    "layer_types",
                    format!(
                        "layer {i} is {}, but {} ignores layer_types and gives every layer {} \
                         ({}); remove layer_types, or use an architecture that reads it",
                        types[i].hf_name(),
                        arch.hf_name(),
                        every.hf_name(),
                        match window {
                            Some(w) => format!("sliding_window = {w}"),
                            None => "no sliding_window".into(),
                        }
                    ),
                )),
            }
        }
    }
}

/// `layer_types` into an exported `config.json`, when the config has them.
pub(super) fn write(c: &Config, obj: &mut Map<String, Value>) {
    if let Some(types) = &c.layer_types {
        let names = types.iter().map(|t| Value::from(t.hf_name())).collect();
        obj.insert("layer_types".into(), Value::Array(names));
    }
}

impl Config {
    /// The sliding window of decoder layer `layer`, `None` for full attention: `sliding_window`
    /// where `layer_types` says `sliding_attention`; without `layer_types` (a config built in
    /// code), every layer of an architecture that slides in all of them.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let w = self.sliding_window?;
        match self.layer_types.as_ref().and_then(|t| t.get(layer)) {
            Some(LayerType::Sliding) => Some(w),
            Some(LayerType::Full) => None,
            None => (rule(self.arch) == Rule::EveryLayer).then_some(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(arch: &str, extra: &str) -> Result<Config> {
        let text = format!(
            r#"{{"architectures":["{arch}"],"vocab_size":64,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2{extra}}}"#
        );
        Config::from_json_str(&text, "model/config.json")
    }

    fn windows(c: &Config) -> Vec<Option<usize>> {
        (0..c.num_hidden_layers)
            .map(|l| c.layer_window(l))
            .collect()
    }

    fn err(arch: &str, extra: &str) -> String {
        cfg(arch, extra).unwrap_err().to_string()
    }

    #[test]
    fn mistral_slides_in_every_layer_with_hf_defaults() {
        let c = cfg("MistralForCausalLM", r#","sliding_window":3"#).unwrap();
        assert_eq!(windows(&c), [Some(3); 4]);
        // Absent: MistralConfig's default of 4096; null: no window.
        let c = cfg("MistralForCausalLM", "").unwrap();
        assert_eq!(
            (c.sliding_window, windows(&c)),
            (Some(4096), vec![Some(4096); 4])
        );
        let c = cfg("MistralForCausalLM", r#","sliding_window":null"#).unwrap();
        assert_eq!(windows(&c), [None; 4]);
        assert_eq!(c.layer_types, None);
    }

    #[test]
    fn qwen2_slides_only_with_use_sliding_window_from_max_window_layers() {
        let off = cfg(
            "Qwen2ForCausalLM",
            r#","sliding_window":8,"max_window_layers":1"#,
        )
        .unwrap();
        assert_eq!((off.sliding_window, windows(&off)), (None, vec![None; 4]));
        let on = r#","use_sliding_window":true,"sliding_window":8,"max_window_layers":1"#;
        let c = cfg("Qwen2ForCausalLM", on).unwrap();
        assert_eq!(windows(&c), [None, Some(8), Some(8), Some(8)]);
        // Defaults: sliding_window 4096, max_window_layers 28 (beyond these 4 layers).
        let c = cfg("Qwen2ForCausalLM", r#","use_sliding_window":true"#).unwrap();
        assert_eq!((c.sliding_window, windows(&c)), (Some(4096), vec![None; 4]));
        // layer_types decides over max_window_layers.
        let types = r#","layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"]"#;
        let c = cfg("Qwen2ForCausalLM", &format!("{on}{types}")).unwrap();
        assert_eq!(windows(&c), [Some(8), None, Some(8), None]);
    }

    #[test]
    fn layer_types_round_trip_through_export() {
        let on = r#","use_sliding_window":true,"sliding_window":8"#;
        let types = r#","layer_types":["full_attention","sliding_attention","sliding_attention","full_attention"]"#;
        for (arch, extra) in [
            ("Qwen2ForCausalLM", format!("{on}{types}")),
            ("Qwen2ForCausalLM", format!("{on},\"max_window_layers\":2")),
            ("Qwen2ForCausalLM", String::new()),
            (
                "MistralForCausalLM",
                r#","sliding_window":5,"layer_types":["sliding_attention","sliding_attention","sliding_attention","sliding_attention"]"#.into(),
            ),
            ("MistralForCausalLM", r#","sliding_window":null"#.into()),
            ("MistralForCausalLM", String::new()),
        ] {
            let c = cfg(arch, &extra).unwrap();
            let json = c.to_hf_json("bfloat16");
            let back = Config::from_json_str(&json.to_string(), "export/config.json").unwrap();
            assert_eq!(back, c, "{arch} {extra}");
            assert_eq!(windows(&back), windows(&c), "{arch} {extra}");
            let written = json.get("layer_types").cloned();
            assert_eq!(written.is_some(), c.layer_types.is_some(), "{arch} {extra}");
        }
        // Qwen2 writes the derived types, as transformers 5 does.
        let c = cfg("Qwen2ForCausalLM", &format!("{on},\"max_window_layers\":2")).unwrap();
        let json = c.to_hf_json("bfloat16");
        let names: Vec<&str> = json["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            names,
            [
                "full_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention"
            ]
        );
    }

    #[test]
    fn bad_layer_types_name_the_field() {
        let on = r#","use_sliding_window":true,"sliding_window":8"#;
        let types = |t: &str| format!(",\"layer_types\":{t}");
        // (architecture, extra keys, what the error must say besides the file).
        let cases = [
            (
                "Qwen2ForCausalLM",
                format!("{on}{}", types(r#"["full_attention"]"#)),
                vec!["layer_types", "1 entries for num_hidden_layers = 4"],
            ),
            (
                "Qwen2ForCausalLM",
                format!(
                    "{on}{}",
                    types(
                        r#"["full_attention","chunked_attention","full_attention","full_attention"]"#
                    )
                ),
                vec!["layer_types[1]", "chunked_attention"],
            ),
            (
                "Qwen2ForCausalLM",
                types(r#""full_attention""#),
                vec!["layer_types", "expected a list"],
            ),
            // Sliding layers without a window: HF refuses to build their mask.
            (
                "Qwen2ForCausalLM",
                types(
                    r#"["full_attention","sliding_attention","full_attention","full_attention"]"#,
                ),
                vec!["layer_types", "layer 1 is sliding_attention"],
            ),
            // Mistral and Llama ignore layer_types in HF: one that disagrees is refused.
            (
                "MistralForCausalLM",
                format!(
                    ",\"sliding_window\":4{}",
                    types(
                        r#"["sliding_attention","full_attention","sliding_attention","sliding_attention"]"#
                    )
                ),
                vec!["layer 1 is full_attention", "MistralForCausalLM"],
            ),
            (
                "LlamaForCausalLM",
                types(
                    r#"["sliding_attention","full_attention","full_attention","full_attention"]"#,
                ),
                vec!["layer_types", "layer 0 is sliding_attention"],
            ),
            (
                "MistralForCausalLM",
                r#","sliding_window":0"#.into(),
                vec!["sliding_window", "at least 1"],
            ),
        ];
        for (arch, extra, want) in cases {
            let e = err(arch, &extra);
            for w in want.iter().chain(&["model/config.json"]) {
                assert!(e.contains(w), "{arch} {extra}: {e}");
            }
        }
    }
}
