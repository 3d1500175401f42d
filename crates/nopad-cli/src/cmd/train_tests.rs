//! `nopad train`'s flag parsing: HF/TRL aliases, defaults and refusals.

use clap::Parser;

use super::*;
use crate::cmd::dist::train_on;

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

/// The losses and gradient norms of a run's JSON log.
fn logged(path: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `--ranks 2` trains what `--ranks 1` with twice the accumulation trains (same global batch),
/// in every sharding stage, within f32's reordering bound. The two add the same micro-batches'
/// gradients in another order (each rank's sum, then the ranks'), which changes each sum by at
/// most a few units of f32 rounding (u = 6e-8) of its terms, and the loss and squared norm are
/// sums of the same kind; AdamW keeps an element's relative error in its update, so over four
/// steps at lr 1e-2 the loss and norm move by a few u of themselves: bound 1e-5 (measured:
/// at most 1.2e-7). Not bit for bit: floating-point addition is not associative.
#[test]
fn ranks_equal_one_rank_with_their_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let run = |flags: &str, name: &str| {
        let log = dir.path().join(name);
        let line = format!(
            "--device cpu --model tiny --synthetic-examples 48 --max-len 32 --batch-size 2 \
             --steps 4 --warmup 1 --lr 1e-2 --no-progress --log {} {flags}",
            log.display()
        );
        let argv = std::iter::once("train").chain(line.split_whitespace());
        let (cfg, device, prec) = Cli::try_parse_from(argv).unwrap().args.resolve().unwrap();
        let s = train_on(device, prec, cfg).unwrap_or_else(|e| panic!("{flags}: {e}"));
        assert_eq!(s.steps_done, 4, "{flags}");
        logged(&log)
    };
    let one = run("--grad-accum 4", "one.jsonl");
    for shard in 0..4 {
        let two = run(
            &format!("--ranks 2 --grad-accum 2 --shard {shard}"),
            "two.jsonl",
        );
        assert_eq!(two.len(), one.len());
        for (step, (a, b)) in one.iter().zip(&two).enumerate() {
            let rel = |x: f64, y: f64| (x - y).abs() / x.abs();
            assert!(
                rel(a.0, b.0) < 1e-5,
                "shard {shard} step {step}: loss {} vs {}",
                a.0,
                b.0
            );
            assert!(
                rel(a.1, b.1) < 1e-5,
                "shard {shard} step {step}: norm {} vs {}",
                a.1,
                b.1
            );
        }
    }
    let e = resolved("--ranks 2 --shard 4").unwrap_err().to_string();
    assert!(e.contains("3 (weights sharded too)"), "{e}");
    let line = "--ranks 2 --device cuda --steps 1";
    let argv = std::iter::once("train").chain(line.split_whitespace());
    let (cfg, device, prec) = Cli::try_parse_from(argv).unwrap().args.resolve().unwrap();
    let e = train_on(device, prec, cfg).unwrap_err().to_string();
    assert!(e.contains("--device cpu"), "{e}");
}

/// `--report-to tensorboard` writes event files into OUT/runs, a resumed run a new one; without
/// --out or --log there is nowhere to put them, which is said.
#[test]
fn tensorboard_event_files_go_into_out_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let flags = |extra: &str| {
        format!(
            "--device cpu --model tiny --synthetic-examples 48 --max-len 32 --batch-size 2 \
             --steps 4 --no-progress --report-to tensorboard --out {} {extra}",
            out.display()
        )
    };
    let go = |line: String| {
        let argv: Vec<&str> = std::iter::once("train")
            .chain(line.split_whitespace())
            .collect();
        let (cfg, device, prec) = Cli::try_parse_from(argv).unwrap().args.resolve().unwrap();
        assert_eq!(cfg.tensorboard, Some(out.join("runs")));
        train_on(device, prec, cfg).unwrap()
    };
    go(flags("--save-every 2 --stop-after 2"));
    go(flags("--resume latest"));
    let mut files: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        // The scalars' tags are in the records (the framing is tested in nopad-train).
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes.windows(10).any(|w| w == b"train/loss"), "{name}");
    }
    let e = resolved("--report-to tensorboard").unwrap_err().to_string();
    assert!(e.contains("give --out or --log"), "{e}");
    let e = resolved("--report-to wandb").unwrap_err().to_string();
    assert!(e.contains("expected tensorboard or none"), "{e}");
}
