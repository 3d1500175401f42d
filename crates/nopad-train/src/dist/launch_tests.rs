//! The launcher with `sh -c` scripts as workers (`$RANK` picks each worker's part).

use super::*;
use crate::dist::assert_says;

/// Options for tests: no signal handlers in the test process, a short grace period.
fn opts(grace_ms: u64) -> LaunchOptions {
    LaunchOptions {
        grace: Duration::from_millis(grace_ms),
        forward_signals: false,
        ..Default::default()
    }
}

/// `sh -c script` as the workers' command.
fn sh(script: &str) -> (OsString, Vec<OsString>) {
    ("sh".into(), vec!["-c".into(), script.into()])
}

fn run(n: usize, script: &str, o: &LaunchOptions) -> (Result<(), DistError>, Duration) {
    let (program, args) = sh(script);
    let start = Instant::now();
    let r = launch_local(n, &program, &args, o);
    (r, start.elapsed())
}

#[test]
fn workers_get_torchruns_variables_and_succeed_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(1000);
    o.env.push(("OUT_DIR".into(), dir.path().into()));
    o.env.push(("RANK".into(), "99".into()));
    let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT" > "$OUT_DIR/$RANK"; echo "to stderr" >&2"#;
    let (r, _) = run(3, script, &o);
    r.unwrap();
    let lines: Vec<String> = (0..3)
        .map(|r| std::fs::read_to_string(dir.path().join(r.to_string())).unwrap())
        .collect();
    let port = lines[0].split_whitespace().last().unwrap().to_string();
    assert!(port.parse::<u16>().unwrap() > 0);
    for (rank, line) in lines.iter().enumerate() {
        // The world's variables win over the extra environment.
        assert_eq!(line.trim(), format!("{rank} 3 {rank} 3 127.0.0.1 {port}"));
    }
}

/// The failed rank, how it ended and its tail, from a launch that must have failed that way.
fn worker_failure(e: &DistError) -> (usize, WorkerExit, &[String]) {
    match e {
        DistError::Worker { rank, exit, tail } => (*rank, *exit, tail),
        other => panic!("expected a worker failure, got {other:?}"),
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named_with_its_last_lines() {
    let script = r#"if [ "$RANK" = 1 ]; then echo "loading" >&2; echo "boom: no such file" >&2; exit 3; fi; exec sleep 30"#;
    let (r, took) = run(3, script, &opts(2000));
    assert!(
        took < Duration::from_secs(10),
        "the others were not stopped: {took:?}"
    );
    let e = r.unwrap_err();
    let (rank, exit, tail) = worker_failure(&e);
    assert_eq!((rank, exit), (1, WorkerExit::Code(3)));
    assert_eq!(tail, ["loading", "boom: no such file"]);
    let msg = e.to_string();
    assert_says(
        &msg,
        &[
            "rank 1 failed (exit status 3)",
            "[rank 1] boom: no such file",
        ],
    );
    assert_eq!(e.exit_code(), Some(3));
}

#[test]
fn a_rank_killed_by_a_signal_is_named_with_the_signal() {
    let script = r#"if [ "$RANK" = 2 ]; then kill -9 $$; fi; exec sleep 30"#;
    let (r, took) = run(3, script, &opts(2000));
    assert!(took < Duration::from_secs(10), "{took:?}");
    let e = r.unwrap_err();
    let (rank, exit, _) = worker_failure(&e);
    assert_eq!((rank, exit), (2, WorkerExit::Signal(9)));
    let says = [
        "rank 2 failed (killed by signal 9 (SIGKILL",
        "it wrote nothing to stderr",
    ];
    assert_says(&e.to_string(), &says);
    assert_eq!(e.exit_code(), Some(137));
}

#[test]
fn workers_that_ignore_sigterm_are_killed_after_the_grace_period() {
    // Every rank but 1 ignores SIGTERM (and so does its sleep); only SIGKILL ends them.
    let script = r#"if [ "$RANK" = 1 ]; then sleep 0.2; exit 1; fi; trap '' TERM; sleep 30"#;
    let (r, took) = run(3, script, &opts(300));
    assert!(
        took < Duration::from_secs(8),
        "not killed after the grace: {took:?}"
    );
    assert_eq!(worker_failure(&r.unwrap_err()).0, 1);
}

#[test]
fn a_forwarded_signal_stops_every_worker_without_calling_it_a_failure() {
    // Workers exit 75 on SIGINT, as a stopped run does; rank 0 takes longer (as if saving).
    let script = r#"trap 'if [ "$RANK" = 0 ]; then sleep 0.5; fi; exit 75' INT; while :; do sleep 0.05; done"#;
    let (program, args) = sh(script);
    let start = Instant::now();
    let mut sent = false;
    let mut signals = || {
        let now = !sent && start.elapsed() > Duration::from_millis(400);
        sent |= now;
        if now {
            vec![libc::SIGINT]
        } else {
            Vec::new()
        }
    };
    let e = supervise(3, &program, &args, &opts(100), &mut signals).unwrap_err();
    assert!(matches!(e, DistError::Interrupted { signal: 2 }), "{e:?}");
    assert_eq!(e.exit_code(), Some(STOPPED_STATUS));
    // Rank 0 was waited for, not killed after the others had stopped.
    assert!(
        start.elapsed() >= Duration::from_millis(850),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn nothing_to_launch_and_a_missing_program_are_errors() {
    let (r, _) = run(0, "true", &opts(100));
    assert!(r.unwrap_err().to_string().contains("at least one worker"));
    let r = launch_local(2, OsStr::new("/nonexistent/nopad"), &[], &opts(100));
    assert_says(
        &r.unwrap_err().to_string(),
        &["worker rank 0: cannot start /nonexistent/nopad"],
    );
}

#[test]
fn the_gpus_flag_is_dropped_from_the_workers_command_line() {
    let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        without_flag(
            &args(&["train", "--gpus", "4", "--steps", "3", "--gpus=2", "x"]),
            "--gpus"
        ),
        args(&["train", "--steps", "3", "x"])
    );
    assert_eq!(
        without_flag(&args(&["train", "--", "--gpus", "4"]), "--gpus"),
        args(&["train", "--", "--gpus", "4"])
    );
    assert_eq!(without_flag(&args(&["--gpus"]), "--gpus"), args(&[]));
}
