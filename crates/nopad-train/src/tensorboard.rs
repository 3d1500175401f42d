//! TensorBoard event files (`--report-to tensorboard`): the step scalars the JSON log holds
//! (loss, learning rate, gradient norm, throughput, evaluation loss), written where TensorBoard
//! looks for them, beside the JSON lines.
//!
//! The format is small enough to write without TensorFlow or a protobuf library: a file of
//! TFRecords (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each
//! holding one `Event` protobuf (`tensorflow/core/util/event.proto`): the first carries only
//! `file_version = "brain.Event:2"`, then one per logged step with a `Summary` of
//! `simple_value`s. A resumed run starts a new file whose first step event is a
//! `SessionLog(START)` at the first step it redoes: TensorBoard then drops the points the
//! interrupted session wrote for those steps, as the JSON log drops their lines.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{io, Result};

/// An open event file.
pub(crate) struct EventWriter {
    path: PathBuf,
    w: BufWriter<fs::File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if missing) for a run that starts after step
    /// `resumed_at` (0: a fresh run).
    pub(crate) fn create(dir: &Path, resumed_at: u64) -> Result<EventWriter> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let now = wall_time();
        // TensorBoard reads every file whose name contains "tfevents", in name order: the time
        // keeps successive sessions' files in order, and a counter apart within one second (a
        // file is never overwritten).
        let (secs, pid) = (now as u64, std::process::id());
        let mut k = 0u32;
        let (path, f) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs}.{pid}.{k:03}.nopad"));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 999 => k += 1,
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut w = EventWriter {
            path,
            w: BufWriter::new(f),
        };
        let mut first = Proto::default();
        first.double(1, now);
        first.bytes(3, b"brain.Event:2");
        w.record(&first.0)?;
        if resumed_at > 0 {
            let mut start = Proto::default();
            start.double(1, now);
            start.varint(2, resumed_at + 1);
            let mut session_log = Proto::default();
            session_log.varint(1, 1); // SessionLog.START
            start.bytes(7, &session_log.0);
            w.record(&start.0)?;
        }
        w.flush()?;
        Ok(w)
    }

    /// The file being written.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event at `step` with a scalar per `(tag, value)` and flushes it (a crash
    /// loses nothing logged). Non-finite values are written as they are: TensorBoard shows them.
    pub(crate) fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Proto::default();
        for (tag, v) in values {
            let mut value = Proto::default();
            value.bytes(1, tag.as_bytes());
            value.float(2, *v as f32);
            summary.bytes(1, &value.0);
        }
        let mut event = Proto::default();
        event.double(1, wall_time());
        event.varint(2, step);
        event.bytes(5, &summary.0);
        self.record(&event.0)?;
        self.flush()
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.w.write_all(&rec).map_err(io(&self.path))
    }

    fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(io(&self.path))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A protobuf message being encoded: the few wire types an `Event` needs.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn key(&mut self, field: u32, wire: u32) {
        self.raw_varint(((field << 3) | wire) as u64);
    }
    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn varint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.raw_varint(v);
    }
    fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
}

/// CRC-32C (Castagnoli), as TFRecord checksums its length and data.
fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masking of a CRC (so that a CRC of data containing CRCs stays well mixed).
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 / iSCSI check values.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    /// Reads the records back, checking both CRCs of each.
    fn records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = fs::read(path).unwrap();
        let (mut out, mut at) = (vec![], 0);
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn events_are_framed_and_encoded_as_tensorboard_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 0).unwrap();
        w.scalars(7, &[("train/loss", 2.5), ("train/lr", 1e-3)])
            .unwrap();
        let recs = records(w.path());
        assert_eq!(recs.len(), 2);
        // First event: wall_time (field 1, fixed64), then file_version (field 3).
        assert_eq!(recs[0][0], 0x09);
        assert_eq!(&recs[0][9..], b"\x1a\x0dbrain.Event:2");
        // Second: wall_time, step 7 (field 2 varint), summary (field 5) of two values, each a
        // tag (field 1) and a simple_value (field 2, fixed32).
        let e = &recs[1];
        assert_eq!(&e[9..11], &[0x10, 7]);
        assert_eq!(e[11], 0x2a);
        let value = |tag: &str, v: f32| {
            let mut m = vec![0x0a, tag.len() as u8];
            m.extend_from_slice(tag.as_bytes());
            m.push(0x15);
            m.extend_from_slice(&v.to_le_bytes());
            let mut out = vec![0x0a, m.len() as u8];
            out.extend(m);
            out
        };
        let summary = [value("train/loss", 2.5), value("train/lr", 1e-3)].concat();
        assert_eq!(e[12] as usize, summary.len());
        assert_eq!(&e[13..], &summary[..]);
    }

    #[test]
    fn a_resumed_run_starts_a_session_at_the_first_redone_step() {
        let dir = tempfile::tempdir().unwrap();
        let w = EventWriter::create(dir.path(), 300).unwrap();
        let recs = records(w.path());
        assert_eq!(recs.len(), 2);
        let e = &recs[1];
        // step 301 as a varint (0xad 0x02), then session_log (field 7) = { status: START }.
        assert_eq!(&e[9..], &[0x10, 0xad, 0x02, 0x3a, 0x02, 0x08, 0x01]);
    }
}
