//! One run per output directory. Two runs writing checkpoints into the same `--out` race: one's
//! `--keep` pruning deletes a checkpoint the other is about to resume from or prune. A run that
//! writes into `--out` holds an exclusive advisory lock on `OUT/.nopad.lock` for its whole life.
//!
//! The lock is the operating system's (`flock` through [`std::fs::File::try_lock`]), so it is
//! released when the process ends in any way, SIGKILL included: a lock file left behind by a
//! dead process is stale and simply taken over. The file holds the owner's process id and host
//! so a refused run can say who holds the directory. A run that ends normally removes the file
//! (then releases the lock); a run that took the lock checks afterwards that the path still
//! names the file it locked, so one that opened the file just before its owner removed it
//! cannot hold a lock on a file nobody else sees.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{io, Result, TrainError};

/// The lock file's name inside `--out`.
pub const LOCK_FILE: &str = ".nopad.lock";

/// An exclusive hold on an output directory, released on drop (or when the process ends).
#[derive(Debug)]
pub struct OutLock {
    // Held only for the lock it carries.
    _file: File,
    path: PathBuf,
}

impl Drop for OutLock {
    fn drop(&mut self) {
        // Removed while still locked (the file is closed, and the lock released, after this).
        let _ = fs::remove_file(&self.path);
    }
}

impl OutLock {
    /// Takes the lock on `out` (created if missing), or refuses with who holds it.
    pub fn acquire(out: &Path) -> Result<OutLock> {
        fs::create_dir_all(out).map_err(io(out))?;
        let path = out.join(LOCK_FILE);
        // A few tries: each lost race with an owner removing the file costs one.
        for _ in 0..8 {
            if let Some(lock) = Self::try_once(out, &path)? {
                return Ok(lock);
            }
        }
        Err(TrainError::Config(format!(
            "{}: could not take the lock {LOCK_FILE}: it keeps being replaced",
            out.display()
        )))
    }

    fn try_once(out: &Path, path: &Path) -> Result<Option<OutLock>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io(path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                let owner = owner.trim();
                let who = if owner.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another nopad run ({owner})")
                };
                return Err(TrainError::Config(format!(
                    "{}: {who} is writing into this output directory; wait for it to finish, \
                     or give this run another --out",
                    out.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io(path)(e)),
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let held = file.metadata().map_err(io(path))?;
            match fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                // Removed or replaced by its previous owner after we opened it.
                _ => return Ok(None),
            }
        }
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let me = format!("pid {} on {}", std::process::id(), host);
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(io(path))?;
        Ok(Some(OutLock {
            _file: file,
            path: path.to_path_buf(),
        }))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_released_lock_is_taken_again() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let first = OutLock::acquire(&out).unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts as a
        // second process would.
        let msg = OutLock::acquire(&out).unwrap_err().to_string();
        assert!(
            msg.contains("another nopad run (pid ") && msg.contains("--out"),
            "{msg}"
        );
        drop(first);
        assert!(
            !out.join(LOCK_FILE).exists(),
            "a finished run leaves no lock file"
        );
        let again = OutLock::acquire(&out).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }

    #[test]
    fn a_stale_lock_file_of_a_dead_process_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        // What a SIGKILLed run leaves: the file with its pid, but no lock held on it.
        fs::write(tmp.path().join(LOCK_FILE), "pid 999999999 on elsewhere").unwrap();
        let lock = OutLock::acquire(tmp.path()).unwrap();
        let text = fs::read_to_string(lock.path()).unwrap();
        assert!(
            text.starts_with(&format!("pid {} on ", std::process::id())),
            "{text}"
        );
    }
}
