//! What the binary's integration tests share: running `nopad` and reading what it printed.
// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The `nopad` binary built for these tests, with no arguments yet.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nopad"))
}

/// Runs `nopad args` to its end.
pub fn nopad<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command()
        .args(args)
        .output()
        .expect("the nopad binary runs")
}

/// What the run printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run's stdout, after asserting that it succeeded (its stderr otherwise).
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "nopad failed:\n{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}
