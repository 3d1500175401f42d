//! Issue 7 through the binary: SIGINT saves and the resumed run is exact; a second signal exits at
//! once; SIGKILL in the middle of saves, many times over, never leaves a checkpoint that resume
//! would trust half-written; resuming another run's checkpoint names the difference.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nopad_train::checkpoint;

mod common;
use common::{args, command, stderr};

/// A tiny run that takes a few milliseconds per step on the CPU.
fn run_args(out: &Path, log: &Path, steps: u32) -> Vec<String> {
    let (out, log) = (out.display().to_string(), log.display().to_string());
    args(
        "train --model tiny --synthetic-examples 64 --max-len 32 --batch-size 4 --device cpu",
        &[
            "--no-progress",
            "--steps",
            &steps.to_string(),
            "--out",
            &out,
            "--log",
            &log,
        ],
    )
}

fn finish(args: &[String]) -> Output {
    let o = common::nopad(args);
    assert!(o.status.success(), "nopad {args:?} failed:\n{}", stderr(&o));
    o
}

fn spawn(args: &[String]) -> Child {
    command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the nopad binary starts")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Waits until the log has at least `n` lines (the run is training).
fn wait_for_lines(log: &Path, n: usize) {
    let t0 = Instant::now();
    while std::fs::read_to_string(log).map_or(0, |t| t.lines().count()) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the run never logged {n} steps"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (step, loss bits) of every step line of a log.
fn losses(log: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?.to_bits())))
        .collect()
}

fn bytes(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The run under test: `dir/run`, logged to `dir/run.jsonl`, for `steps` steps with `flags`
/// (split at spaces) and `more` after them; returns the output folder, the log and the arguments.
fn run_under_test(
    dir: &Path,
    steps: u32,
    flags: &str,
    more: &[&str],
) -> (PathBuf, PathBuf, Vec<String>) {
    let (out, log) = (dir.join("run"), dir.join("run.jsonl"));
    let mut a = run_args(&out, &log, steps);
    a.extend(args(flags, more));
    (out, log, a)
}

/// An uninterrupted run of the same arguments, in `dir/ref`, that an interrupted run must match.
struct Reference {
    out: PathBuf,
    log: PathBuf,
}

impl Reference {
    fn run(dir: &Path, steps: u32) -> Self {
        let (out, log) = (dir.join("ref"), dir.join("ref.jsonl"));
        finish(&run_args(&out, &log, steps));
        Reference { out, log }
    }

    /// The run that wrote `out` and `log` logged the same losses and saved the same weights.
    fn assert_same(&self, out: &Path, log: &Path) {
        assert_eq!(losses(log), losses(&self.log));
        assert_eq!(
            bytes(out.join("model.safetensors")),
            bytes(self.out.join("model.safetensors"))
        );
    }
}

/// Every visible `checkpoint-*` directory must be complete and load; returns the names of the
/// hidden (temporary) entries.
fn check_visible_checkpoints_are_whole(out: &Path) -> Vec<String> {
    let mut hidden = vec![];
    let Ok(entries) = std::fs::read_dir(out) else {
        return hidden;
    };
    for e in entries {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with(".checkpoint-") {
            hidden.push(name);
        } else if name.starts_with("checkpoint-") {
            let dir = out.join(&name);
            let st = checkpoint::load_state(&dir)
                .unwrap_or_else(|e| panic!("a visible checkpoint is not whole: {e}"));
            assert_eq!(format!("checkpoint-{:06}", st.step), name);
            let cfg = nopad_model::weights::read_config(&dir).unwrap();
            let layout = nopad_model::Layout::new(&cfg);
            nopad_model::weights::load_checkpoint(&dir, &cfg, &layout, |_, _| Ok(()))
                .unwrap_or_else(|e| panic!("{name}: weights do not load: {e}"));
            let opt = std::fs::metadata(dir.join("optimizer.safetensors")).unwrap();
            assert!(
                opt.len() >= 8 * layout.total as u64,
                "{name}: short optimizer state"
            );
        }
    }
    hidden
}

#[test]
fn sigint_saves_a_checkpoint_and_the_resumed_run_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let reference = Reference::run(dir.path(), 60);

    // Slow saves stretch each step to ~10 ms so the signal lands mid-run.
    let flags = "--save-every 1 --keep 2 --test-save-delay-ms 2";
    let (out, log, mut args) = run_under_test(dir.path(), 60, flags, &[]);
    let child = spawn(&args);
    wait_for_lines(&log, 5);
    signal(&child, "-INT");
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(75),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("stopped by SIGINT after step"), "{stdout}");
    assert!(stdout.contains("--resume latest"), "{stdout}");
    assert!(
        !out.join("model.safetensors").exists(),
        "final weights written by a stopped run"
    );
    let (found, _) = checkpoint::latest(&out).unwrap();
    let stopped_at = found.expect("a checkpoint was saved").1.step;
    assert!(stopped_at < 60);

    args.push("--resume".into());
    args.push("latest".into());
    let o = finish(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("at step {stopped_at} of 60")),
        "{stderr}"
    );
    reference.assert_same(&out, &log);
}

#[test]
fn a_second_signal_exits_at_once_leaving_no_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log, args) = run_under_test(dir.path(), 5000, "--test-save-delay-ms 400", &[]);
    let child = spawn(&args);
    wait_for_lines(&log, 3);
    signal(&child, "-INT");
    // The step ends within milliseconds; the save then sleeps 400 ms between its files.
    let t0 = Instant::now();
    while check_visible_checkpoints_are_whole(&out).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the save never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, "-INT");
    let t0 = Instant::now();
    let o = child.wait_with_output().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "the second signal did not exit at once"
    );
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let hidden = check_visible_checkpoints_are_whole(&out);
    assert!(
        hidden.len() == 1 && hidden[0].contains(".tmp-"),
        "expected the interrupted save's tmp dir, found {hidden:?}"
    );
    assert!(checkpoint::latest(&out).unwrap().0.is_none());

    // `--resume latest` with nothing complete starts afresh (saying so) and clears the leftover.
    let mut again = run_args(&out, &log, 3);
    again.extend(["--resume", "latest", "--save-every", "3"].map(String::from));
    let o = finish(&again);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("no complete checkpoint under"), "{stdout}");
    assert_eq!(
        check_visible_checkpoints_are_whole(&out),
        Vec::<String>::new()
    );
}

#[test]
fn sigkill_in_the_middle_of_saves_never_leaves_a_checkpoint_resume_would_trust() {
    let dir = tempfile::tempdir().unwrap();
    let reference = Reference::run(dir.path(), 150);

    let flags = "--resume latest --save-every 1 --keep 3 --test-save-delay-ms 2";
    let (out, log, args) = run_under_test(dir.path(), 150, flags, &[]);
    let (mut mid_save, mut resumed, mut seen) = (0, 0, std::collections::HashSet::new());
    for i in 0..20u64 {
        let mut child = spawn(&args);
        // Wait for the first save (so machine load cannot make every kill land in start-up),
        // then a staggered delay: most kills land inside one of the later saves' files.
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut lines = vec![];
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
            let saved = line.contains("nopad: saved");
            lines.push(line);
            if saved {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis((i * 7) % 30));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        if lines.iter().any(|l| l.contains("resumed from")) {
            resumed += 1;
        }
        // A tmp directory carries its writer's pid: a new name is a save this kill interrupted.
        for name in check_visible_checkpoints_are_whole(&out) {
            if seen.insert(name) {
                mid_save += 1;
            }
        }
        if let (Some((dir, st)), _) = checkpoint::latest(&out).unwrap() {
            assert_eq!(dir, out.join(checkpoint::dir_name(st.step)));
        }
    }
    let last = checkpoint::latest(&out)
        .unwrap()
        .0
        .map_or(0, |(_, st)| st.step);
    eprintln!("20 SIGKILLs: {mid_save} inside a save, {resumed} runs resumed, reached step {last}");
    assert!(
        mid_save >= 5,
        "only {mid_save} of 20 kills hit a save: the test lost its point"
    );
    assert!(resumed >= 15, "only {resumed} of 20 runs resumed");
    // However often it was killed, the finished run equals the uninterrupted one.
    finish(&args);
    reference.assert_same(&out, &log);
}

#[test]
fn resuming_with_other_data_or_another_strategy_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let record = |i: usize| {
        let ids: Vec<String> = (0..6 + i % 9)
            .map(|j| ((i * 7 + j * 3) % 90 + 1).to_string())
            .collect();
        format!("{{\"input_ids\": [{}]}}\n", ids.join(", "))
    };
    let text: String = (0..30).map(record).collect();
    std::fs::write(&data, &text).unwrap();
    let data = data.display().to_string();
    let (_, _, args) = run_under_test(dir.path(), 6, "--data", &[&data]);
    let mut first = args.clone();
    first.extend(["--stop-after", "2"].map(String::from));
    finish(&first);
    let refused = |extra: &[&str]| -> String {
        let mut a = args.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--resume") {
            a.extend(["--resume", "latest"].map(String::from));
        }
        let o = common::nopad(&a);
        assert_eq!(o.status.code(), Some(2), "resumed a mismatched run");
        stderr(&o)
    };
    let e = refused(&["--strategy", "pad"]);
    assert!(
        e.contains("checkpoint-000002") && e.contains("`strategy`"),
        "{e}"
    );
    // Same size, one token changed.
    std::fs::write(&data, text.replacen("[8, ", "[9, ", 1)).unwrap();
    let e = refused(&[]);
    assert!(e.contains("`data.checksum` (data file content)"), "{e}");
    assert!(e.contains("train.jsonl"), "{e}");
    let e = refused(&["--resume", "nowhere"]);
    assert!(e.contains("`resume`: nowhere is not a directory"), "{e}");
    // Flags that need another flag say which.
    for (flags, needs) in [
        (&["--save-every", "2"][..], "`save-every` needs `out`"),
        (&["--resume", "latest"], "`resume latest` needs `out`"),
        (&["--eval-every", "2"], "`eval-every` needs `eval-data`"),
        (&["--keep", "0"], "`keep`: must be at least 1"),
    ] {
        let o = command().arg("train").args(flags).output().unwrap();
        let e = stderr(&o);
        assert!(
            o.status.code() == Some(2) && e.contains(needs),
            "{flags:?}: {e}"
        );
    }
}
