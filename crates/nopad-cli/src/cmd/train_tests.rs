//! `nopad train`'s flag parsing: HF/TRL aliases, defaults and refusals.

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

fn resolved(line: &str) -> Result<TrainConfig> {
    let argv = std::iter::once("train").chain(line.split_whitespace());
    Ok(Cli::try_parse_from(argv)?.args.resolve()?.0)
}

/// Each HF/TRL flag name resolves to the same settings as nopad's own.
#[test]
fn hf_flag_names_are_aliases() {
    let pairs = [
        ("--lr 1e-4", "--learning-rate 1e-4"),
        ("--epochs 2", "--num-train-epochs 2"),
        ("--batch-size 3", "--per-device-train-batch-size 3"),
        ("--grad-accum 4", "--gradient-accumulation-steps 4"),
        ("--out o", "--output-dir o"),
        ("--max-len 64", "--max-seq-length 64"),
        ("--max-len 64", "--max-length 64"),
        ("--steps 7", "--max-steps 7"),
        ("--warmup 3", "--warmup-steps 3"),
        ("--schedule linear", "--lr-scheduler-type linear"),
        ("--log-every 5", "--logging-steps 5"),
        ("--out o --save-every 5", "--out o --save-steps 5"),
        ("--out o --keep 2", "--out o --save-total-limit 2"),
        ("--max-grad-norm 0.5", "--max-grad-norm 0.5"),
    ];
    let base = format!("{:?}", resolved("").unwrap());
    for (ours, theirs) in pairs {
        let a = format!("{:?}", resolved(ours).unwrap());
        assert_eq!(a, format!("{:?}", resolved(theirs).unwrap()), "{theirs}");
        if !ours.starts_with("--max-grad-norm 0.5") {
            assert_ne!(a, base, "{ours} changes nothing");
        }
    }
}

/// The same names are keys of a config file.
#[test]
fn hf_names_are_config_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "learning-rate = 1e-4\nmax-steps = 7\n").unwrap();
    let a = resolved(&format!("--config {}", p.display())).unwrap();
    assert_eq!((a.lr, a.steps), (1e-4, Some(7)));
}

#[test]
fn warmup_ratio_is_kept_and_excludes_warmup() {
    let c = resolved("--warmup-ratio 0.1").unwrap();
    assert_eq!(c.warmup_ratio, Some(0.1));
    assert_eq!(nopad_train::warmup_steps(c.warmup, c.warmup_ratio, 95), 10);
    assert!(resolved("--warmup 3 --warmup-ratio 0.1").is_err());
    let e = resolved("--warmup-ratio 1.5").unwrap_err().to_string();
    assert!(e.contains("`warmup-ratio`"), "{e}");
}

/// An HF model directory gets fine-tuning defaults; a preset keeps the demo's.
#[test]
fn fine_tuning_defaults_with_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = nopad_model::Config::preset("tiny").unwrap();
    cfg.max_position_embeddings = 100_000;
    let json = serde_json::to_string(&cfg.to_hf_json("float32")).unwrap();
    std::fs::write(dir.path().join("config.json"), json).unwrap();
    let c = resolved(&format!("--model {}", dir.path().display())).unwrap();
    assert_eq!((c.lr, c.min_lr, c.max_len), (2e-5, 2e-5 * 0.1, 4096));
    let c = resolved(&format!(
        "--model {} --lr 1e-3 --max-len 64",
        dir.path().display()
    ));
    let c = c.unwrap();
    assert_eq!((c.lr, c.max_len), (1e-3, 64));
    let c = resolved("--model tiny").unwrap();
    assert_eq!((c.lr, c.min_lr, c.max_len), (3e-3, 3e-4, 512));
}
