//! What an unlucky or hostile user meets: rows with nothing to train, the loader's flags on
//! `eval`, and two runs pointed at the same `--out`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{args, command, dir_with, eval_on_cpu, stderr};

/// `nopad eval --json` of the tiny preset on `data`, with `extra` (split at spaces).
fn eval(data: &Path, extra: &str) -> Output {
    eval_on_cpu("tiny", data, &format!("--json {extra}"))
}

#[test]
fn eval_skips_and_counts_rows_with_no_target_and_strict_refuses_them() {
    let (_dir, data) = dir_with(
        "heldout.jsonl",
        "{\"input_ids\": [1, 5, 9, 13, 2], \"labels\": [-100, -100, 9, 13, 2]}\n\
         {\"input_ids\": [1]}\n\
         {\"input_ids\": [1, 40, 41], \"labels\": [-100, -100, -100]}\n\
         {\"input_ids\": [1, 7, 7, 2]}\n",
    );
    let o = eval(&data, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Targets: 3 (first row) + 3 (last row); the two rows between hold none.
    assert_eq!(r["tokens"], 6);
    assert!(
        stderr(&o).contains("2 examples with no target tokens skipped"),
        "{}",
        stderr(&o)
    );
    let o = eval(&data, "--strict");
    assert!(!o.status.success());
    assert!(stderr(&o).contains(":2"), "names the line: {}", stderr(&o));
}

#[test]
fn eval_takes_the_loader_flags_train_takes() {
    let (_dir, data) = dir_with(
        "heldout.jsonl",
        "{\"input_ids\": [1, 5, 9, 13, 2, 8, 8, 8, 8, 8]}\nnot json\n{\"input_ids\": [1, 7, 7, 2]}\n",
    );
    let o = eval(&data, "--format pretokenized");
    assert!(!o.status.success(), "a bad record stops eval by default");
    assert!(stderr(&o).contains(":2"), "{}", stderr(&o));
    let o = eval(
        &data,
        "--format pretokenized --skip-bad --max-len 6 --long split",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Split at 6 tokens: [1 5 9 13 2 8] (5 targets) + [8 8 8 8] (3) + [1 7 7 2] (3).
    assert_eq!(r["tokens"], 11, "{}", stderr(&o));
}

#[test]
fn a_second_run_into_the_same_out_is_refused_while_the_first_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train = |steps: &str| {
        args(
            "train --device cpu --model tiny --data synthetic-flan --synthetic-examples 64 \
             --save-every 1 --no-progress --test-save-delay-ms 400",
            &["--steps", steps, "--out", out.to_str().unwrap()],
        )
    };
    let mut first = command()
        .args(train("50"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".nopad.lock");
    let t0 = Instant::now();
    // Until the lock holds its owner's pid (written right after the lock is taken).
    while std::fs::metadata(&lock).map_or(true, |m| m.len() == 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = command().args(train("2")).output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    assert!(!second.status.success());
    let msg = stderr(&second);
    assert!(
        msg.contains("is writing into this output directory") && msg.contains("pid "),
        "{msg}"
    );
}
