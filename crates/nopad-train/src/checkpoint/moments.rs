//! `optimizer.safetensors`: AdamW's two moments in their own precision (see the layout in the
//! parent module's docs), streamed between the optimizer's states and the file in chunks of whole
//! 8-bit blocks, with every name, type and size checked on the way back.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use nopad_backend::codes::QUANT_BLOCK;
use nopad_backend::{Backend, Moment, StateData};
use serde_json::json;

use super::CHUNK;
use crate::error::{io, Result, TrainError};
use crate::optimizer::{states_name, Optimizer, StatePrecision};

/// The tensors of one moment in a state of `precision` over `n` parameters in `blocks` 8-bit
/// blocks: name suffix, safetensors dtype, element count and bytes per element. fp32 and bf16
/// moments are one tensor; 8-bit moments are their codes and, as `NAME.scales`, one f32 scale
/// per block (the blocks of each of the optimizer's parts, see [`Optimizer::states`]).
fn moment_tensors(
    precision: StatePrecision,
    n: usize,
    blocks: usize,
) -> Vec<(&'static str, &'static str, usize, usize)> {
    match precision {
        StatePrecision::F32 => vec![("", "F32", n, 4)],
        StatePrecision::Bf16 => vec![("", "BF16", n, 2)],
        StatePrecision::Block8 => vec![("", "U8", n, 1), (".scales", "F32", blocks, 4)],
    }
}

const MOMENTS: [(&str, Moment); 2] = [("exp_avg", Moment::First), ("exp_avg_sq", Moment::Second)];

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The optimizer's state precision and the number of 8-bit blocks of all its parts.
fn precision_and_blocks<B: Backend>(opt: &Optimizer<B>) -> (StatePrecision, usize) {
    let blocks = opt
        .state_lens()
        .iter()
        .map(|len| len.div_ceil(QUANT_BLOCK))
        .sum();
    (opt.cfg.states, blocks)
}

/// Writes `[P]` moments in their own precision as one safetensors file (see
/// [`moment_tensors`]), streaming from the device in chunks of whole blocks.
pub(super) fn write_optimizer<B: Backend>(
    b: &B,
    path: &Path,
    opt: &Optimizer<B>,
    n: usize,
) -> Result<()> {
    let (precision, blocks) = precision_and_blocks(opt);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "nopad-optimizer", "step": opt.step.to_string(),
               "optim-states": states_name(precision)}),
    );
    let mut start = 0;
    for (name, _) in MOMENTS {
        for (suffix, dtype, count, size) in moment_tensors(precision, n, blocks) {
            let end = start + count * size;
            header.insert(
                format!("{name}{suffix}"),
                json!({"dtype": dtype, "shape": [count], "data_offsets": [start, end]}),
            );
            start = end;
        }
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // safetensors aligns the data to 8 bytes by padding the header with spaces.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let f = fs::File::create(path).map_err(io(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&header))
        .map_err(io(path))?;
    for (_, which) in MOMENTS {
        // 8-bit scales follow all the codes of their moment.
        let mut scales = vec![];
        for (part, len) in opt.state_lens().into_iter().enumerate() {
            let mut off = 0;
            while off < len {
                let end = (off + CHUNK).min(len);
                let raw = match opt.read_state(b, part, which, off..end)? {
                    StateData::F32(x) => f32_bytes(&x),
                    StateData::Bf16(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    StateData::Block8 { codes, scales: s } => {
                        scales.extend(s);
                        codes
                    }
                };
                w.write_all(&raw).map_err(io(path))?;
                off = end;
            }
        }
        w.write_all(&f32_bytes(&scales)).map_err(io(path))?;
    }
    let f = w.into_inner().map_err(|e| io(path)(e.into_error()))?;
    f.sync_all().map_err(io(path))
}

/// Reads the moments written by [`write_optimizer`] into `opt`, checking names, types and sizes;
/// moments of another precision than this run's are refused, naming both.
pub(super) fn read_optimizer<B: Backend>(
    b: &B,
    path: &Path,
    opt: &mut Optimizer<B>,
    n: usize,
) -> Result<()> {
    let bad = |msg: String| TrainError::Config(format!("{}: {msg}", path.display()));
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io(path))?;
    let hlen = u64::from_le_bytes(len);
    if hlen > 1 << 20 {
        return Err(bad(format!(
            "header of {hlen} bytes: not an optimizer state"
        )));
    }
    let mut header = vec![0u8; hlen as usize];
    f.read_exact(&mut header).map_err(io(path))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let (precision, blocks) = precision_and_blocks(opt);
    // Checkpoints from before the precisions existed hold fp32 moments and say nothing.
    let saved = header["__metadata__"]["optim-states"]
        .as_str()
        .unwrap_or("f32");
    if saved != states_name(precision) {
        return Err(bad(format!(
            "the moments were saved as --optim-states {saved}, this run has --optim-states {}: \
             resume with the precision the checkpoint was written with",
            states_name(precision)
        )));
    }
    let file_len = f.metadata().map_err(io(path))?.len();
    for (name, which) in MOMENTS {
        let mut parts = vec![];
        for (suffix, dtype, count, size) in moment_tensors(precision, n, blocks) {
            let name = format!("{name}{suffix}");
            let t = header
                .get(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` missing")))?;
            let (start, end) = match t["data_offsets"].as_array().map(|a| a.as_slice()) {
                Some([s, e]) => (s.as_u64().unwrap_or(u64::MAX), e.as_u64().unwrap_or(0)),
                _ => return Err(bad(format!("tensor `{name}`: no data_offsets"))),
            };
            if t["dtype"] != dtype
                || t["shape"] != json!([count])
                || end.checked_sub(start) != Some((size * count) as u64)
                || 8 + hlen + end > file_len
            {
                return Err(bad(format!(
                    "tensor `{name}`: expected {dtype} [{count}] (dtype {}, shape {}, {} bytes in a file of {file_len}): \
                     was the checkpoint made for another model?",
                    t["dtype"], t["shape"], end.saturating_sub(start)
                )));
            }
            parts.push(8 + hlen + start);
        }
        let mut read_at = |pos: u64, bytes: usize| -> Result<Vec<u8>> {
            let mut raw = vec![0u8; bytes];
            f.seek(SeekFrom::Start(pos)).map_err(io(path))?;
            f.read_exact(&mut raw).map_err(io(path))?;
            Ok(raw)
        };
        let to_f32 = |raw: Vec<u8>| -> Vec<f32> {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let scales = match precision {
            StatePrecision::Block8 => to_f32(read_at(parts[1], 4 * blocks)?),
            _ => vec![],
        };
        // `at`: the part's first element in the file, `first_block`: its first scale.
        let (mut at, mut first_block) = (0usize, 0usize);
        for (part, len) in opt.state_lens().into_iter().enumerate() {
            let mut off = 0;
            while off < len {
                let end = (off + CHUNK).min(len);
                let (k, pos) = (end - off, (at + off) as u64);
                let data = match precision {
                    StatePrecision::F32 => {
                        StateData::F32(to_f32(read_at(parts[0] + 4 * pos, 4 * k)?))
                    }
                    StatePrecision::Bf16 => StateData::Bf16(
                        read_at(parts[0] + 2 * pos, 2 * k)?
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect(),
                    ),
                    StatePrecision::Block8 => StateData::Block8 {
                        codes: read_at(parts[0] + pos, k)?,
                        scales: scales[first_block + off / QUANT_BLOCK
                            ..first_block + end.div_ceil(QUANT_BLOCK)]
                            .to_vec(),
                    },
                };
                opt.write_state(b, part, which, off, &data)?;
                off = end;
            }
            at += len;
            first_block += len.div_ceil(QUANT_BLOCK);
        }
    }
    Ok(())
}
