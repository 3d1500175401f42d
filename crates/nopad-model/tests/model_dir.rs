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
