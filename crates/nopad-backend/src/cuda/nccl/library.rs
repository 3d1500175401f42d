//! libnccl, opened at run time: the entry points nopad calls, resolved once, and NCCL's result
//! codes turned into words.
//!
//! cudarc's own NCCL loader tries only unversioned names and `.so.<CUDA major>` suffixes, which
//! miss the `libnccl.so.2` that NCCL's packages and PyTorch's wheels install, and it panics on a
//! missing library or symbol. So the entry points are resolved here with libloading (the crate
//! cudarc loads every library with), while the types (`ncclConfig_t`, `ncclUniqueId`, the data
//! type and reduction enums) are cudarc's, which follow NCCL's header. Results come back as plain
//! integers rather than cudarc's `ncclResult_t` enum: a code a newer library adds must not be an
//! invalid enum value.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};

use crate::{BackendError, Result};

/// File names tried in order: the versioned soname first (what the packages and wheels ship),
/// then the development link.
pub(crate) const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Oldest version with `ncclCommInitRankConfig`, non-blocking communicators and
/// `ncclCommFinalize` (2.14.0, in NCCL's version code).
pub(crate) const MIN_VERSION: i32 = 21400;

/// `ncclSuccess`.
pub(crate) const SUCCESS: u32 = 0;
/// `ncclInProgress`: a non-blocking call has not finished yet.
pub(crate) const IN_PROGRESS: u32 = 7;

/// A CUDA stream as NCCL takes it (`cudaStream_t`, the driver's `CUstream`).
pub(crate) type Stream = *mut c_void;

type Reduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, u32, u32, ncclComm_t, Stream) -> u32;
type Gather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, u32, ncclComm_t, Stream) -> u32;
type OnComm = unsafe extern "C" fn(ncclComm_t) -> u32;

/// The opened library and the entry points nopad uses.
pub(crate) struct Library {
    /// Keeps the entry points below valid.
    _lib: libloading::Library,
    /// The file that was opened.
    pub name: &'static str,
    /// NCCL's version code (`major * 10000 + minor * 100 + patch`).
    pub version: i32,
    pub get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> u32,
    pub init_rank_config:
        unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> u32,
    pub get_async_error: unsafe extern "C" fn(ncclComm_t, *mut u32) -> u32,
    pub finalize: OnComm,
    pub destroy: OnComm,
    pub abort: OnComm,
    pub all_reduce: Reduce,
    pub reduce_scatter: Reduce,
    pub all_gather: Gather,
    error_string: unsafe extern "C" fn(u32) -> *const c_char,
    /// `ncclGetLastError` (2.13+): the library's own detail on the last failure.
    last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
}

/// The library, opened on first use; the error names what is missing and what to do.
pub(crate) fn library() -> Result<&'static Library> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(open)
        .as_ref()
        .map_err(|e| BackendError::Unavailable(e.clone()))
}

fn open() -> std::result::Result<Library, String> {
    let mut tried = Vec::new();
    for name in LIBRARY_NAMES {
        // SAFETY: opening NCCL runs only its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return resolve(lib, name),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "NCCL library {} not found ({}): install NCCL, or add the directory that holds \
         libnccl.so.2 to LD_LIBRARY_PATH (PyTorch's pip wheels ship it in \
         site-packages/nvidia/nccl/lib)",
        LIBRARY_NAMES[0],
        tried.join("; ")
    ))
}

fn resolve(lib: libloading::Library, name: &'static str) -> std::result::Result<Library, String> {
    fn sym<T: Copy>(
        lib: &libloading::Library,
        name: &str,
        sym: &str,
    ) -> std::result::Result<T, String> {
        // SAFETY: every `T` below is the C signature of the symbol in NCCL's header (results
        // and enums as 32-bit integers); the library outlives the copy (both live in `Library`).
        unsafe { lib.get::<T>(sym.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{name} has no {sym} ({e}); NCCL 2.14 or newer is needed"))
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> u32 = sym(&lib, name, "ncclGetVersion")?;
    let mut version: c_int = 0;
    // SAFETY: writes one int.
    let code = unsafe { get_version(&mut version) };
    if code != SUCCESS || version < MIN_VERSION {
        return Err(format!(
            "{name} is NCCL {}, nopad needs 2.14 or newer (non-blocking communicators); \
             put a newer libnccl.so.2 first on LD_LIBRARY_PATH",
            version_string(version)
        ));
    }
    Ok(Library {
        get_unique_id: sym(&lib, name, "ncclGetUniqueId")?,
        init_rank_config: sym(&lib, name, "ncclCommInitRankConfig")?,
        get_async_error: sym(&lib, name, "ncclCommGetAsyncError")?,
        finalize: sym(&lib, name, "ncclCommFinalize")?,
        destroy: sym(&lib, name, "ncclCommDestroy")?,
        abort: sym(&lib, name, "ncclCommAbort")?,
        all_reduce: sym(&lib, name, "ncclAllReduce")?,
        reduce_scatter: sym(&lib, name, "ncclReduceScatter")?,
        all_gather: sym(&lib, name, "ncclAllGather")?,
        error_string: sym(&lib, name, "ncclGetErrorString")?,
        last_error: sym(&lib, name, "ncclGetLastError").ok(),
        version,
        name,
        _lib: lib,
    })
}

impl Library {
    /// What `code` means, with the library's detail on the last failure of `comm` when it has
    /// one: "remote process exited or there was a network error (ncclRemoteError): ...".
    pub(crate) fn describe(&self, code: u32, comm: ncclComm_t) -> String {
        // SAFETY: NCCL returns a static string for any code.
        let text = unsafe { c_str((self.error_string)(code)) };
        let mut msg = format!("{} ({})", text.unwrap_or_default(), code_name(code));
        if let Some(last) = self.last_error {
            // SAFETY: `comm` is a live communicator or null (both accepted); the string is
            // NCCL's own buffer, copied at once.
            if let Some(detail) = unsafe { c_str(last(comm)) }.filter(|d| !d.trim().is_empty()) {
                msg.push_str(": ");
                msg.push_str(detail.trim());
            }
        }
        msg
    }
}

/// Copies a C string that may be null.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn c_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The name of an NCCL result code, as in `nccl.h`.
pub(crate) fn code_name(code: u32) -> String {
    let name = match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => return format!("NCCL result {code}"),
    };
    name.into()
}

/// "2.21.5" from NCCL's version code (`major * 10000 + minor * 100 + patch` since 2.9, `major *
/// 1000 + minor * 100 + patch` before).
pub(crate) fn version_string(code: i32) -> String {
    let (major, rest) = if code >= 10000 {
        (code / 10000, code % 10000)
    } else {
        (code / 1000, code % 1000)
    };
    format!("{major}.{}.{}", rest / 100, rest % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_codes_read_as_in_the_header() {
        assert_eq!(version_string(22105), "2.21.5");
        assert_eq!(version_string(21400), "2.14.0");
        assert_eq!(version_string(2708), "2.7.8");
        assert_eq!(code_name(6), "ncclRemoteError");
        assert_eq!(code_name(IN_PROGRESS), "ncclInProgress");
        assert_eq!(code_name(42), "NCCL result 42");
    }

    #[test]
    fn a_missing_library_is_unavailable_with_what_to_do() {
        // Where NCCL is installed the library opens; elsewhere the error must say what to do.
        match library() {
            Ok(lib) => assert!(lib.version >= MIN_VERSION, "{}", lib.version),
            Err(BackendError::Unavailable(msg)) => {
                for part in ["libnccl.so.2", "LD_LIBRARY_PATH", "nvidia/nccl/lib"] {
                    assert!(msg.contains(part), "{part:?} missing from {msg:?}");
                }
            }
            Err(e) => panic!("expected Unavailable, got {e}"),
        }
    }
}
