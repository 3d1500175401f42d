//! The local launcher behind `nopad train --gpus N`: one worker process per GPU, each told its
//! place through torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port), so a worker cannot tell it from torchrun.
//! `CUDA_VISIBLE_DEVICES` is left as it is: each worker opens device `LOCAL_RANK`.
//!
//! Output: rank 0's stdout and stderr are the launcher's own (its progress bar still sees the
//! terminal); the other ranks' lines are forwarded prefixed with `[rank R] `, and their last
//! stderr lines are kept for the error.
//!
//! Failure: when a worker exits non-zero or is killed by a signal, the others get SIGTERM, and
//! SIGKILL after [`LaunchOptions::grace`]; the error names the first rank that failed, how, and
//! its last stderr lines. Each worker runs in its own process group, so stopping it stops what it
//! started, and (on Linux) gets SIGTERM if the launcher itself dies.
//!
//! Signals: with [`LaunchOptions::forward_signals`], SIGINT and SIGTERM sent to the launcher (a
//! terminal's Ctrl-C reaches only the launcher, the workers being in their own groups) are
//! forwarded to every worker once per signal, so the first asks them to finish the step, save and
//! exit [`STOPPED_STATUS`], and a second ends them at once, as for a single process. Workers that
//! exit with [`STOPPED_STATUS`] after a forwarded signal have not failed: the launcher waits for
//! all of them (rank 0 may be writing the checkpoint). The handlers stay installed (doing
//! nothing) after [`launch_local`] returns: the process is expected to exit then.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::env::WORLD_VARS;
use super::DistError;

/// The status a worker exits with after a signal stopped it once its checkpoint was saved (the
/// status of a stopped `nopad train`, EX_TEMPFAIL: "try again", i.e. resume).
pub const STOPPED_STATUS: i32 = 75;

/// How often the launcher looks at its workers (and how late a failure is noticed at most).
const POLL: Duration = Duration::from_millis(20);
/// How long the output of workers that have ended may still take to drain.
const DRAIN: Duration = Duration::from_secs(2);

/// How the launcher runs its workers.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Time between SIGTERM and SIGKILL when the other workers are stopped after a failure.
    pub grace: Duration,
    /// Lines of a failed worker's stderr quoted in the error.
    pub tail_lines: usize,
    /// Extra environment for every worker (the world's variables always win).
    pub env: Vec<(OsString, OsString)>,
    /// Catch SIGINT and SIGTERM and forward them to the workers (see the module's doc).
    pub forward_signals: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            grace: Duration::from_secs(5),
            tail_lines: 20,
            env: Vec::new(),
            forward_signals: true,
        }
    }
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this status.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl WorkerExit {
    fn of(status: ExitStatus) -> WorkerExit {
        match (status.code(), status.signal()) {
            (Some(code), _) => WorkerExit::Code(code),
            (None, Some(sig)) => WorkerExit::Signal(sig),
            // Neither: a stopped or continued process, which `try_wait` does not report.
            (None, None) => WorkerExit::Code(-1),
        }
    }

    /// The status a shell would show: the exit status, or 128 + the signal.
    pub fn code(&self) -> i32 {
        match *self {
            WorkerExit::Code(c) => c,
            WorkerExit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            WorkerExit::Code(c) => write!(f, "exit status {c}"),
            WorkerExit::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(s)),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL, e.g. the kernel's out-of-memory killer",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "see `kill -l`",
    }
}

/// Runs `program args` as `n` workers of one run on this host and waits for them all. `Ok` when
/// every worker exits 0; [`DistError::Worker`] naming the first that failed (the others are
/// stopped); [`DistError::Interrupted`] when a forwarded signal stopped them.
pub fn launch_local(
    n: usize,
    program: &OsStr,
    args: &[OsString],
    opts: &LaunchOptions,
) -> Result<(), DistError> {
    if !opts.forward_signals {
        return supervise(n, program, args, opts, &mut Vec::new);
    }
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| DistError::Launch(format!("installing the SIGINT/SIGTERM handlers: {e}")))?;
    let result = supervise(n, program, args, opts, &mut || signals.pending().collect());
    signals.handle().close();
    result
}

/// `args` without `flag` and its value (`--gpus 4` or `--gpus=4`): the command line a worker is
/// started with. Arguments after `--` are left alone.
pub fn without_flag(args: &[OsString], flag: &str) -> Vec<OsString> {
    let joined = format!("{flag}=");
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--" {
            out.push(a.clone());
            out.extend(iter.cloned());
            break;
        }
        if a == flag {
            iter.next();
        } else if !a.to_str().is_some_and(|s| s.starts_with(&joined)) {
            out.push(a.clone());
        }
    }
    out
}

/// One running worker.
struct Worker {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    /// Its last stderr lines (none for rank 0, whose stderr is the launcher's).
    tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Worker {
    /// Sends `sig` to the worker's process group, unless it has ended.
    fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) on the group the worker leads (its pid, not yet reaped, so
            // not reused). A group already gone is not an error worth reporting.
            unsafe { libc::kill(-(self.child.id() as i32), sig) };
        }
    }
}

/// [`launch_local`] with the signals to forward taken from `signals` (polled, non-blocking).
pub(super) fn supervise(
    n: usize,
    program: &OsStr,
    args: &[OsString],
    opts: &LaunchOptions,
    signals: &mut dyn FnMut() -> Vec<i32>,
) -> Result<(), DistError> {
    if n == 0 {
        return Err(DistError::Launch(
            "a local launch needs at least one worker (--gpus 0)".into(),
        ));
    }
    let port = free_port()?;
    let mut workers: Vec<Worker> = Vec::with_capacity(n);
    for rank in 0..n {
        match start(rank, n, port, program, args, opts) {
            Ok(w) => workers.push(w),
            Err(e) => {
                kill_all(&mut workers);
                return Err(e);
            }
        }
    }
    let mut failure: Option<(usize, WorkerExit)> = None;
    let mut signalled = None;
    let mut kill_at = None;
    loop {
        for sig in signals() {
            signalled = Some(sig);
            workers.iter().for_each(|w| w.signal(sig));
        }
        let failed_before = failure.is_some();
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            let status = match w.child.try_wait() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    let msg = format!("cannot watch worker rank {}: {e}", w.rank);
                    kill_all(&mut workers);
                    return Err(DistError::Launch(msg));
                }
            };
            w.status = Some(status);
            let exit = WorkerExit::of(status);
            let stopped = signalled.is_some() && exit == WorkerExit::Code(STOPPED_STATUS);
            if exit != WorkerExit::Code(0) && !stopped && failure.is_none() {
                failure = Some((w.rank, exit));
            }
        }
        if failure.is_some() && !failed_before {
            workers.iter().for_each(|w| w.signal(libc::SIGTERM));
            kill_at = Some(Instant::now() + opts.grace);
        }
        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            workers.iter().for_each(|w| w.signal(libc::SIGKILL));
            kill_at = None;
        }
        std::thread::sleep(POLL);
    }
    drain(&mut workers);
    if let Some((rank, exit)) = failure {
        let tail = workers[rank]
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        return Err(DistError::Worker { rank, exit, tail });
    }
    let stopped = workers
        .iter()
        .any(|w| w.status.map(WorkerExit::of) == Some(WorkerExit::Code(STOPPED_STATUS)));
    match signalled {
        Some(signal) if stopped => Err(DistError::Interrupted { signal }),
        _ => Ok(()),
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the rendezvous binds it again; the window in
/// between is the same one torchrun's `--standalone` lives with).
fn free_port() -> Result<u16, DistError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DistError::Launch(format!("cannot find a free port on 127.0.0.1: {e}")))
}

/// Starts worker `rank` of `n`.
fn start(
    rank: usize,
    n: usize,
    port: u16,
    program: &OsStr,
    args: &[OsString],
    opts: &LaunchOptions,
) -> Result<Worker, DistError> {
    let mut cmd = Command::new(program);
    cmd.args(args).envs(opts.env.iter().map(|(k, v)| (k, v)));
    let values = [
        rank.to_string(),
        n.to_string(),
        rank.to_string(),
        n.to_string(),
        "127.0.0.1".to_string(),
        port.to_string(),
    ];
    cmd.envs(WORLD_VARS.iter().zip(values));
    cmd.stdin(Stdio::null());
    if rank > 0 {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let launch_err = |what: String| DistError::Launch(format!("worker rank {rank}: {what}"));
    let mut child = cmd
        .spawn()
        .map_err(|e| launch_err(format!("cannot start {}: {e}", program.to_string_lossy())))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let mut readers = Vec::new();
    let streams: [(Option<Box<dyn Read + Send>>, bool); 2] = [
        (child.stdout.take().map(|s| Box::new(s) as _), false),
        (child.stderr.take().map(|s| Box::new(s) as _), true),
    ];
    for (stream, is_err) in streams {
        let Some(stream) = stream else { continue };
        let keep = is_err.then(|| (tail.clone(), opts.tail_lines));
        match forward(stream, rank, is_err, keep) {
            Ok(r) => readers.push(r),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(launch_err(format!("cannot start its output thread: {e}")));
            }
        }
    }
    Ok(Worker {
        rank,
        child,
        status: None,
        tail,
        readers,
    })
}

/// Copies a worker's output line by line to the launcher's stderr (`to_stderr`) or stdout,
/// prefixed with `[rank R] `, keeping the last `keep.1` lines in `keep.0`.
fn forward(
    stream: Box<dyn Read + Send>,
    rank: usize,
    to_stderr: bool,
    keep: Option<(Arc<Mutex<VecDeque<String>>>, usize)>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("rank-{rank}-output"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                // One write per line, so lines of different ranks do not interleave.
                let out = format!("[rank {rank}] {text}\n");
                let _ = if to_stderr {
                    std::io::stderr().lock().write_all(out.as_bytes())
                } else {
                    std::io::stdout().lock().write_all(out.as_bytes())
                };
                if let Some((tail, max)) = &keep {
                    if let Ok(mut t) = tail.lock() {
                        t.push_back(text.to_string());
                        while t.len() > *max {
                            t.pop_front();
                        }
                    }
                }
            }
        })
}

/// Waits (briefly) for the output threads of ended workers; a thread whose pipe something else
/// still holds open is left behind rather than waited for.
fn drain(workers: &mut [Worker]) {
    let until = Instant::now() + DRAIN;
    for w in workers {
        for r in std::mem::take(&mut w.readers) {
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

/// Kills every started worker at once and reaps it (setup failed; nothing to save yet).
fn kill_all(workers: &mut [Worker]) {
    for w in workers.iter() {
        w.signal(libc::SIGKILL);
    }
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        w.status = w.child.wait().ok();
    }
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
