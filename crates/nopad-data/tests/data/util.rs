//! What the integration tests share: traceable examples and temp files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use nopad_data::{Example, IGNORE_INDEX};
use nopad_rng::Rng;

/// Token ids encode (example, position) so a batch can be traced back: id = 1 + i * STRIDE + t.
pub const STRIDE: i32 = 10_000;

/// `n` examples with random lengths in [1, max_len] and random prompt masks.
pub fn traceable(seed: u64, n: usize, max_len: usize) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            // Mix short and long, as real data does.
            let len = if rng.below(4) == 0 {
                rng.range(1, max_len as u64)
            } else {
                rng.range(1, (max_len as u64 / 4).max(1))
            } as usize;
            let input_ids: Vec<i32> = (0..len).map(|t| 1 + i as i32 * STRIDE + t as i32).collect();
            let prompt = rng.below(len as u64) as usize;
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < prompt { IGNORE_INDEX } else { id })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}

/// Which example a traceable token belongs to, and at which position.
pub fn trace(token: i32) -> (usize, usize) {
    (
        ((token - 1) / STRIDE) as usize,
        ((token - 1) % STRIDE) as usize,
    )
}

/// A fresh temp directory, unique per call (tests run in parallel).
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nopad-data-{}-{k}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &std::path::Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write test file");
    p
}
