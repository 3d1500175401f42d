//! The tokenised-data cache (`--dataset-cache DIR`): what loading a file gave, kept so that a
//! rerun or a resume with the same data, tokenizer, template and options skips tokenisation.
//!
//! Owns the key and the file. The key hashes everything loading reads or is told: the data's
//! path and the bytes of its files, the model's tokenizer files (tokenizer.json, tokenizer_config.json,
//! chat_template.jinja), a `--chat-template` file, every option that changes the examples, and
//! this crate's version and cache format. A cache file holds a header (magic, format version,
//! key, payload length and checksum) and the examples and load report. A file that is stale (its
//! key is not the one asked for), truncated or corrupt is never trusted: loading tokenises again,
//! says why in the report's warnings, and writes a fresh file.
//!
//! The hash is std's SipHash (two lanes, 128 bits). Its algorithm may change with the Rust
//! release: a binary built by another toolchain then misses and rebuilds the cache, which costs
//! time and never a wrong example.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::Hasher;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::load::{LoadOptions, LoadReport};
use crate::Example;

/// The first bytes of every cache file.
const MAGIC: &[u8; 8] = b"NOPADEX\0";
/// Bumped whenever the payload's layout, or what any conversion produces, changes.
const VERSION: u32 = 1;

/// A 128-bit key or checksum: two SipHash lanes told apart by a first byte.
struct Digest([DefaultHasher; 2]);

impl Digest {
    fn new() -> Self {
        let mut lanes = [DefaultHasher::new(), DefaultHasher::new()];
        for (i, lane) in lanes.iter_mut().enumerate() {
            lane.write_u8(i as u8);
        }
        Digest(lanes)
    }
    /// `bytes`, prefixed by their length so that consecutive fields cannot run into each other.
    fn field(&mut self, bytes: &[u8]) {
        self.stream(&(bytes.len() as u64).to_le_bytes());
        self.stream(bytes);
    }
    /// The next piece of one byte stream (SipHash's result does not depend on the pieces).
    fn stream(&mut self, bytes: &[u8]) {
        for lane in &mut self.0 {
            lane.write(bytes);
        }
    }
    fn finish(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.0[0].finish().to_le_bytes());
        out[8..].copy_from_slice(&self.0[1].finish().to_le_bytes());
        out
    }
}

/// The key of loading `path` (the bytes of its files: `data`, one file's but for a saved
/// dataset's directory) under `opts`. `None` when a file the key needs cannot be read: loading
/// then runs uncached and reports that file itself.
pub(crate) fn key(path: &Path, data: &[&[u8]], opts: &LoadOptions) -> Option<[u8; 16]> {
    // Destructured so that an option added to LoadOptions cannot be left out of the key.
    let LoadOptions {
        format,
        max_len,
        long,
        skip_bad,
        vocab_size,
        tokenizer_dir,
        strict,
        stop: _,
        loss_on,
        chat_template,
        dataset_cache: _,
        columns,
    } = opts;
    let mut d = Digest::new();
    d.field(&VERSION.to_le_bytes());
    d.field(env!("CARGO_PKG_VERSION").as_bytes());
    d.field(path.as_os_str().as_encoded_bytes());
    // One field per file: a single file's key is what it was before directories were read.
    for bytes in data {
        d.field(bytes);
    }
    // The tokenizer files as the loader finds them: absent and empty differ.
    if let Some(dir) = tokenizer_dir {
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            match std::fs::read(dir.join(name)) {
                Ok(bytes) => d.field(&bytes),
                Err(_) => d.field(b"absent"),
            }
        }
    }
    if let Some(t) = chat_template {
        d.field(&std::fs::read(t).ok()?);
    }
    let options = format!(
        "format={:?} max_len={max_len} long={long} skip_bad={skip_bad} vocab={vocab_size:?} \
         tokenizer={} strict={strict} loss_on={:?} template={} columns={columns:?}",
        format.map(|f| f.name()),
        tokenizer_dir.is_some(),
        loss_on.map(|l| l.name()),
        chat_template.is_some(),
    );
    d.field(options.as_bytes());
    Some(d.finish())
}

/// The cache file of `key` in `dir`.
pub(crate) fn file_of(dir: &Path, key: &[u8; 16]) -> PathBuf {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}.nopadex"))
}

/// The report's counts, in the order they are stored.
fn counts(r: &mut LoadReport) -> [&mut usize; 7] {
    [
        &mut r.records,
        &mut r.examples,
        &mut r.skipped,
        &mut r.no_targets,
        &mut r.truncated,
        &mut r.split,
        &mut r.dropped,
    ]
}

/// The payload's bytes: the report's counts and warnings, then each example (length, ids,
/// labels), all little-endian, handed to `out` a piece at a time so that neither the checksum
/// nor the file needs them whole in memory (they are as large as the tokenised data).
fn payload(
    examples: &[Example],
    report: &LoadReport,
    out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let word = |v: usize| (v as u64).to_le_bytes();
    let mut r = report.clone();
    for c in counts(&mut r) {
        out(&word(*c))?;
    }
    out(&word(r.warnings.len()))?;
    for line in &r.warnings {
        out(&word(line.len()))?;
        out(line.as_bytes())?;
    }
    out(&word(examples.len()))?;
    let mut buf = vec![];
    for e in examples {
        buf.clear();
        buf.extend_from_slice(&word(e.len()));
        for x in e.input_ids.iter().chain(&e.labels) {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        out(&buf)?;
    }
    Ok(())
}

/// The payload's length in bytes, as [`payload`] writes it.
fn payload_len(examples: &[Example], report: &LoadReport) -> usize {
    let warnings: usize = report.warnings.iter().map(|w| 8 + w.len()).sum();
    let ids: usize = examples.iter().map(|e| 8 + 8 * e.len()).sum();
    8 * 7 + 8 + warnings + 8 + ids
}

/// Reads a payload from a stream of a known length, hashing every byte it reads.
struct Reader<R> {
    from: R,
    left: usize,
    sum: Digest,
}

impl<R: Read> Reader<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        if n > self.left {
            return Err("a length runs past the end of the file".into());
        }
        let mut buf = vec![0u8; n];
        self.from
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read it: {e}"))?;
        self.left -= n;
        self.sum.stream(&buf);
        Ok(buf)
    }
    fn word(&mut self) -> Result<usize, String> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(v).map_err(|_| format!("a count of {v} does not fit"))
    }
    fn ids(&mut self, n: usize) -> Result<Vec<i32>, String> {
        let bytes = self.take(n.checked_mul(4).ok_or("a length overflows")?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn parse_payload<R: Read>(r: &mut Reader<R>) -> Result<(Vec<Example>, LoadReport), String> {
    let mut report = LoadReport::default();
    for c in counts(&mut report) {
        *c = r.word()?;
    }
    for _ in 0..r.word()? {
        let n = r.word()?;
        let line = String::from_utf8(r.take(n)?).map_err(|_| "a warning is not UTF-8")?;
        report.warnings.push(line);
    }
    let n = r.word()?;
    // Each example takes at least its length word: a count beyond that is corruption, caught
    // before anything is allocated for it.
    if n > r.left / 8 {
        return Err(format!("{n} examples cannot fit in the file"));
    }
    let mut examples = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.word()?;
        let input_ids = r.ids(len)?;
        let labels = r.ids(len)?;
        examples.push(Example { input_ids, labels });
    }
    if r.left != 0 {
        return Err("bytes after the last example".into());
    }
    Ok((examples, report))
}

/// The header: magic, format version, key, payload length, payload checksum.
const HEADER: usize = 8 + 4 + 16 + 8 + 16;

/// What `file` holds for `key`: `Ok(None)` when there is no such file, `Err(why)` when there is
/// one that cannot be trusted.
pub(crate) fn read(
    file: &Path,
    key: &[u8; 16],
) -> Result<Option<(Vec<Example>, LoadReport)>, String> {
    let f = match File::open(file) {
        Ok(f) => f,
        // No file (or no directory to hold one): nothing cached yet.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let size = f
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    let mut from = BufReader::new(f);
    let mut h = [0u8; HEADER];
    if size < HEADER as u64 || from.read_exact(&mut h).is_err() || &h[..8] != MAGIC {
        return Err("not a nopad dataset cache file".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(format!(
            "written by cache format {version}, this nopad reads {VERSION}"
        ));
    }
    if h[12..28] != key[..] {
        return Err("stale: it was written for other data, tokenizer or options".into());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&h[28..36]);
    let len = u64::from_le_bytes(len);
    let body = size - HEADER as u64;
    if body != len {
        return Err(format!(
            "truncated or extended: {body} bytes of data, the header says {len}"
        ));
    }
    let mut r = Reader {
        from,
        left: usize::try_from(len).map_err(|_| "too large for this machine")?,
        sum: Digest::new(),
    };
    let parsed = parse_payload(&mut r);
    // Checked first: a corrupt file may also fail to parse, and corrupt is the better reason.
    if r.sum.finish()[..] != h[36..52] {
        return Err("corrupt: its checksum does not match its data".into());
    }
    parsed.map(Some)
}

/// Writes the cache file of `key` (atomically: a temporary file renamed into place).
pub(crate) fn write(
    file: &Path,
    key: &[u8; 16],
    examples: &[Example],
    report: &LoadReport,
) -> io::Result<()> {
    let mut sum = Digest::new();
    payload(examples, report, &mut |b| {
        sum.stream(b);
        Ok(())
    })?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        let mut out = BufWriter::new(File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(key)?;
        out.write_all(&(payload_len(examples, report) as u64).to_le_bytes())?;
        out.write_all(&sum.finish())?;
        payload(examples, report, &mut |b| out.write_all(b))?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if written.is_err() {
        // A partial file must not stay behind (it would never be read, only fill the disk).
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
