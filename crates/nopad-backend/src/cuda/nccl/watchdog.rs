//! The communicator's shared state and its watchdog: every collective is bracketed by two events
//! on the backend's stream, and a thread checks the oldest unfinished one and NCCL's asynchronous
//! error. A collective that has run longer than the timeout once the stream reached it, or an
//! error NCCL reports, aborts the communicator (`ncclCommAbort`, which also ends NCCL's kernels
//! still waiting for a peer) and becomes the error every later call returns. That is what turns a
//! dead or hung peer into an error on every rank instead of a hang.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent};
use cudarc::nccl::sys::ncclComm_t;

use super::library::{Library, IN_PROGRESS, SUCCESS};

/// How often the watchdog looks (a failure is seen at most this late after the timeout).
const POLL: Duration = Duration::from_millis(20);

/// The variable nopad-train reads the timeout from, named in timeout errors.
const TIMEOUT_VAR: &str = "NOPAD_NCCL_TIMEOUT";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A communicator handle; null once aborted or destroyed.
pub(super) struct RawComm(pub ncclComm_t);

// SAFETY: NCCL communicators may be used from any thread; every use goes through the mutex in
// `Shared`, so no two threads call into one communicator at once.
unsafe impl Send for RawComm {}

/// One enqueued collective: events before and after it on the stream, and what it was.
struct Pending {
    start: CudaEvent,
    end: CudaEvent,
    what: String,
    /// When the watchdog first saw `start` complete (the stream reached the collective).
    started: Option<Instant>,
}

/// What the caller's thread and the watchdog share.
pub(super) struct Shared {
    pub lib: &'static Library,
    pub rank: usize,
    /// The timeout in milliseconds (changeable while running, see `NcclComm::set_timeout`).
    timeout_ms: AtomicU64,
    comm: Mutex<RawComm>,
    pending: Mutex<VecDeque<Pending>>,
    /// The first failure, as the error message every later call returns.
    failure: OnceLock<String>,
    stop: AtomicBool,
}

impl Shared {
    pub fn new(lib: &'static Library, comm: ncclComm_t, rank: usize, timeout: Duration) -> Self {
        Shared {
            lib,
            rank,
            timeout_ms: AtomicU64::new(millis(timeout)),
            comm: Mutex::new(RawComm(comm)),
            pending: Mutex::new(VecDeque::new()),
            failure: OnceLock::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// How long a collective may run once started (and a non-blocking call may take).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst))
    }

    /// Changes the timeout from now on (collectives already running included).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::SeqCst);
    }

    /// The communicator, locked (null once aborted).
    pub fn comm(&self) -> MutexGuard<'_, RawComm> {
        // A panic while holding it cannot leave the handle half-written: take it as it is.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first failure so far.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Records `msg` as the failure (unless one was recorded before) and aborts the
    /// communicator; returns the failure that stands. Never call with the communicator locked.
    pub fn fail(&self, msg: String) -> String {
        if self.failure.set(msg).is_ok() {
            let failure = self.failure().unwrap_or_default();
            // Said at once: the thread that will return it may be blocked on the stream.
            eprintln!("nopad: {failure}; aborting the NCCL communicator");
            let mut comm = self.comm();
            if !comm.0.is_null() {
                // SAFETY: a live communicator, aborted once (the handle is cleared with it).
                // Its result is of no use: the communicator is gone either way.
                let _ = unsafe { (self.lib.abort)(comm.0) };
                comm.0 = std::ptr::null_mut();
            }
        }
        self.failure().unwrap_or_default().to_string()
    }

    /// NCCL's asynchronous state of the communicator: `SUCCESS`, `IN_PROGRESS` or an error code
    /// with its description. `None` once the communicator is gone.
    pub fn async_state(&self, comm: &RawComm) -> Option<(u32, String)> {
        if comm.0.is_null() {
            return None;
        }
        let mut state = SUCCESS;
        // SAFETY: a live communicator (the caller holds the lock); writes one int.
        let code = unsafe { (self.lib.get_async_error)(comm.0, &mut state) };
        let state = if code == SUCCESS { state } else { code };
        let why = if state == SUCCESS || state == IN_PROGRESS {
            String::new()
        } else {
            self.lib.describe(state, comm.0)
        };
        Some((state, why))
    }

    /// Polls NCCL until a non-blocking call on the communicator has finished, for at most the
    /// timeout: `Ok` when it succeeded, else the failure (recorded, communicator aborted).
    pub fn settle(&self, what: &str) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let state = self.async_state(&self.comm());
            match state {
                None => return Err(self.fail(self.gone())),
                Some((SUCCESS, _)) => return Ok(()),
                Some((IN_PROGRESS, _)) if start.elapsed() < self.timeout() => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Some((IN_PROGRESS, _)) => {
                    return Err(self.fail(format!(
                        "rank {}: {what} did not finish within {:?}: another rank died, hangs \
                         or never reached it ({TIMEOUT_VAR} sets the limit)",
                        self.rank,
                        self.timeout(),
                    )))
                }
                Some((_, why)) => {
                    return Err(self.fail(format!("rank {}: {what} failed: {why}", self.rank)))
                }
            }
        }
    }

    fn gone(&self) -> String {
        format!("rank {}: the NCCL communicator was aborted", self.rank)
    }

    /// Hands an enqueued collective to the watchdog.
    pub fn watch(&self, start: CudaEvent, end: CudaEvent, what: String) {
        self.queue().push_back(Pending {
            start,
            end,
            what,
            started: None,
        });
    }

    /// One look: NCCL's asynchronous error, then the oldest unfinished collective (the stream
    /// runs them in order, so a later one cannot have finished first). A failure is recorded.
    fn check(&self) {
        let state = self.async_state(&self.comm());
        if let Some((code, why)) = state {
            if code != SUCCESS && code != IN_PROGRESS {
                self.fail(format!("rank {}: NCCL reported an error: {why}", self.rank));
                return;
            }
        }
        let mut queue = self.queue();
        while let Some(front) = queue.front_mut() {
            match front.end.try_is_complete() {
                Ok(true) => {
                    queue.pop_front();
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    let msg = format!("rank {}: CUDA error during {}: {e}", self.rank, front.what);
                    drop(queue);
                    self.fail(msg);
                    return;
                }
            }
            if front.started.is_none() && front.start.try_is_complete().unwrap_or(false) {
                front.started = Some(Instant::now());
            }
            if let Some(t) = front.started.filter(|t| t.elapsed() > self.timeout()) {
                let msg = format!(
                    "rank {}: {} did not complete within {:.0?} of starting: another rank died, \
                     hangs or never reached it ({TIMEOUT_VAR} sets the limit)",
                    self.rank,
                    front.what,
                    t.elapsed()
                );
                drop(queue);
                self.fail(msg);
            }
            return;
        }
    }

    /// Asks the watchdog to end (it ends within one poll).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts the watchdog of `shared`: it looks every [`POLL`] until stopped or a failure is
/// recorded.
pub(super) fn spawn(
    shared: Arc<Shared>,
    ctx: Arc<CudaContext>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("nccl-watchdog-{}", shared.rank))
        .spawn(move || {
            // Event queries and destruction run in the backend's context.
            if let Err(e) = ctx.bind_to_thread() {
                shared.fail(format!("rank {}: NCCL watchdog: {e}", shared.rank));
                return;
            }
            while !shared.stop.load(Ordering::SeqCst) && shared.failure().is_none() {
                shared.check();
                std::thread::sleep(POLL);
            }
        })
}
