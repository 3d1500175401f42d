//! Host-side work lists: the (sequence, tile) pairs every kernel launch walks, built from the
//! host copy of `cu_seqlens`, and the workspace layout they imply.
//!
//! Tiles are 64 rows. A tile descriptor is `[seq_start, seq_len, tile_index, pad_start]` (an
//! `int4` on the device), where `pad_start` is the tile's sequence's first row in the padded
//! scratch layout `[H, Tpad]` (each sequence rounded up to whole tiles, so scratch reads need no
//! bounds checks). Runs of consecutive sequences of at most 64 tokens share one tile ("packed":
//! `seq_start` = first row, `seq_len` = rows, `tile_index = -(k + 1)` naming row k of the segment
//! table, which gives each row's sequence start; the kernels add a block-diagonal mask), so a
//! batch of 2000 sequences of 1-32 tokens needs ~500 tiles rather than 2000. Lists are sorted by cost, longest first, so the heaviest tiles start in the first wave
//! and short ones fill the tail. Nothing here touches the GPU except the upload, from a page-locked
//! buffer borrowed from the `staging` pool on first use.
//!
//! The sliding window (`FlashDims::window`) does not enter the plan, so one plan serves the
//! windowed and the full-attention layers of a model. Under a window W a query tile's cost
//! (key tiles visited) is `min(m + 1, c_W)` and a key tile's `min(nt - n, c'_W)` for constants
//! of W: non-decreasing functions of the causal costs, so the causal order is longest first
//! under the window too. The kernels skip the tiles beyond the window themselves.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;

use crate::choice::Tiles;
use crate::staging::{StagingBuf, StagingPool};
use crate::{FlashDims, FlashError};

/// Rows per tile in every kernel (query tiles and key tiles alike) but the wide forward.
pub const TILE: usize = 64;
/// Query rows per tile of the wide forward (4 warps x 32 rows).
pub const WIDE_TILE: usize = 128;
/// The length split of the routes: on mma.sync, sequences of at least this many tokens run the
/// wide forward
/// (128-row tiles: half the shared-memory reads per FLOP) and the rest with the 64-row one
/// (which skips masked 16-key blocks, so it wastes less on short sequences).
pub const AUTO_WIDE_MIN: usize = 512;

/// One tile descriptor, `[seq_start, seq_len, tile_index, pad_start]`.
pub type TileDesc = [i32; 4];

/// Byte offsets of the workspace sections (each 256-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WorkspaceLayout {
    /// Query-tile list, `[q_tiles][4]` i32, followed directly by the other lists.
    pub tiles: usize,
    /// Key-tile list `[kv_tiles][4]` i32 (contiguous after the query tiles).
    pub kv_tiles: usize,
    /// 128-row query tiles of the long sequences `[auto_wide][4]` i32 (`Tiles::QueryLong128`).
    pub auto_wide: usize,
    /// 64-row query tiles of the short sequences `[auto_narrow][4]` i32 (`Tiles::QueryShort`).
    pub auto_narrow: usize,
    /// 128-key tiles of the long sequences `[kv_wide][4]` i32 (`Tiles::KeysLong128`).
    pub kv_wide: usize,
    /// 64-key tiles of the short sequences `[kv_rest][4]` i32 (`Tiles::KeysShort`).
    pub kv_rest: usize,
    /// Segment table `[packed][64]` i32: row r of packed tile k belongs to the sequence that
    /// starts at local row `segs[64 k + r]`.
    pub segs: usize,
    /// `lse2: [H, Tpad]` fp32, LSE in log2 units (+inf on padding rows).
    pub lse2: usize,
    /// `D: [H, Tpad]` fp32, rowsum(dO * O) (0 on padding rows).
    pub d: usize,
    /// Total bytes.
    pub total: usize,
}

/// Host-built tile lists for one packed batch; reuse it for forward and backward of that batch.
pub struct Plan {
    pub(crate) n_tokens: usize,
    pub(crate) t_pad: usize,
    seq_lens: Vec<usize>,
    /// The longest sequence's length (0 for an empty batch).
    max_len: usize,
    /// Query tiles (forward, preprocess, dQ), longest first.
    pub(crate) q_tiles: Vec<TileDesc>,
    /// Key tiles (dK/dV), most query tiles to visit first.
    pub(crate) kv_tiles: Vec<TileDesc>,
    /// 128-row tiles (index in 128-row units) of the sequences of at least `AUTO_WIDE_MIN`
    /// tokens and the 64-row tiles of the others, each longest first.
    pub(crate) auto_wide: Vec<TileDesc>,
    pub(crate) auto_narrow: Vec<TileDesc>,
    /// The backward's key tiles split by length: 128-key tiles (index in 128-key units) of the
    /// sequences of at least `AUTO_WIDE_MIN` tokens (two-warpgroup kernel), and the 64-key
    /// tiles of the others, each longest first.
    pub(crate) kv_wide: Vec<TileDesc>,
    pub(crate) kv_rest: Vec<TileDesc>,
    /// The packed tiles' segment table `[packed][64]`: local start row of each row's sequence.
    pub(crate) segs: Vec<i32>,
    /// `q_tiles ++ kv_tiles ++ auto_wide ++ auto_narrow ++ kv_wide ++ kv_rest ++ segs`,
    /// flattened: what goes to the workspace.
    pub(crate) host: Vec<i32>,
    /// The page-locked copy of `host`, borrowed from the pool on the first upload and returned
    /// when the plan drops.
    staged: Mutex<Option<(Arc<StagingPool>, StagingBuf)>>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        let staged = self.staged.get_mut().map(|s| s.take());
        if let Ok(Some((pool, buf))) = staged {
            pool.give_back(buf);
        }
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("n_tokens", &self.n_tokens)
            .field("t_pad", &self.t_pad)
            .field("q_tiles", &self.q_tiles.len())
            .field("kv_tiles", &self.kv_tiles.len())
            .finish()
    }
}

fn align256(x: usize) -> usize {
    x.div_ceil(256) * 256
}

impl Plan {
    /// Validate `cu_seqlens` against `dims` and build the sorted tile lists.
    pub fn new(cu_seqlens: &[i32], dims: &FlashDims) -> Result<Plan, FlashError> {
        Plan::with_packing(cu_seqlens, dims, true)
    }

    /// As [`Plan::new`]; `pack = false` gives every sequence its own tiles.
    pub fn with_packing(
        cu_seqlens: &[i32],
        dims: &FlashDims,
        pack_short: bool,
    ) -> Result<Plan, FlashError> {
        let bad = |msg: String| Err(FlashError::InvalidSeqlens(msg));
        if cu_seqlens.len() != dims.n_seqs + 1 {
            return bad(format!(
                "cu_seqlens has {} entries, expected n_seqs + 1 = {}",
                cu_seqlens.len(),
                dims.n_seqs + 1
            ));
        }
        if cu_seqlens[0] != 0 {
            return bad(format!("cu_seqlens[0] = {}, expected 0", cu_seqlens[0]));
        }
        let mut q_tiles = Vec::new();
        let mut kv_tiles = Vec::new();
        let mut q_cost = Vec::new();
        let mut kv_cost = Vec::new();
        let mut wide_tiles = Vec::new();
        let mut wide_cost = Vec::new();
        let mut kv_wide = Vec::new();
        let mut kv_wide_cost = Vec::new();
        let mut segs: Vec<i32> = Vec::new();
        let mut pad = 0usize;
        let mut max_len = 0usize;
        // A run of consecutive short sequences waiting to share one tile: (first row, local starts).
        let mut pack: Option<(i32, Vec<i32>)> = None;
        let rows_in = |pack: &Option<(i32, Vec<i32>)>| pack.as_ref().map_or(0, |p| p.1.len());
        let flush = |pack: &mut Option<(i32, Vec<i32>)>,
                     q: &mut Vec<TileDesc>,
                     kv: &mut Vec<TileDesc>,
                     qc: &mut Vec<usize>,
                     kc: &mut Vec<usize>,
                     segs: &mut Vec<i32>,
                     pad: &mut usize| {
            if let Some((row0, starts)) = pack.take() {
                let rows = starts.len() as i32;
                // One sequence alone is an ordinary tile; two or more get a segment table.
                let z = if starts.iter().all(|&s| s == 0) {
                    0
                } else {
                    let k = (segs.len() / TILE) as i32;
                    segs.extend(starts.iter().copied());
                    segs.resize(segs.len() + TILE - starts.len(), TILE as i32);
                    -(k + 1)
                };
                q.push([row0, rows, z, *pad as i32]);
                kv.push([row0, rows, z, *pad as i32]);
                qc.push(1);
                kc.push(1);
                *pad += TILE;
            }
        };
        // Every flush hands the same lists to the closure above.
        macro_rules! flush_pack {
            () => {
                flush(
                    &mut pack,
                    &mut q_tiles,
                    &mut kv_tiles,
                    &mut q_cost,
                    &mut kv_cost,
                    &mut segs,
                    &mut pad,
                )
            };
        }
        for (b, w) in cu_seqlens.windows(2).enumerate() {
            if w[1] < w[0] {
                return bad(format!(
                    "cu_seqlens decreases at sequence {b}: {} -> {}",
                    w[0], w[1]
                ));
            }
            let len = (w[1] - w[0]) as usize;
            max_len = max_len.max(len);
            let nt = len.div_ceil(TILE);
            if len == 0 {
                continue;
            }
            if pack_short && len <= TILE {
                if rows_in(&pack) + len > TILE {
                    flush_pack!();
                }
                let p = pack.get_or_insert_with(|| (w[0], Vec::new()));
                let local = w[0] - p.0;
                p.1.extend(std::iter::repeat_n(local, len));
                continue;
            }
            flush_pack!();
            for m in 0..len.div_ceil(WIDE_TILE) {
                wide_tiles.push([w[0], len as i32, m as i32, pad as i32]);
                wide_cost.push(((m + 1) * WIDE_TILE).min(len).div_ceil(TILE));
                if len >= AUTO_WIDE_MIN {
                    kv_wide.push([w[0], len as i32, m as i32, pad as i32]);
                    kv_wide_cost.push(nt - 2 * m);
                }
            }
            for m in 0..nt {
                q_tiles.push([w[0], len as i32, m as i32, pad as i32]);
                q_cost.push(m + 1);
                kv_tiles.push([w[0], len as i32, m as i32, pad as i32]);
                kv_cost.push(nt - m);
            }
            pad += nt * TILE;
        }
        flush_pack!();
        let n_tokens = *cu_seqlens.last().unwrap_or(&0) as usize;
        if n_tokens != dims.n {
            return bad(format!(
                "cu_seqlens ends at {n_tokens}, but dims.n = {}",
                dims.n
            ));
        }
        if max_len > dims.max_seqlen {
            return bad(format!(
                "a sequence has {max_len} tokens > dims.max_seqlen = {}",
                dims.max_seqlen
            ));
        }
        if pad > i32::MAX as usize / 2 {
            return bad(format!(
                "{n_tokens} tokens exceed the i32 row indices of the kernels"
            ));
        }
        // Stable sorts: equal costs keep sequence order, so the list is deterministic.
        let mut qi: Vec<usize> = (0..q_tiles.len()).collect();
        qi.sort_by_key(|&i| std::cmp::Reverse(q_cost[i]));
        let mut ki: Vec<usize> = (0..kv_tiles.len()).collect();
        ki.sort_by_key(|&i| std::cmp::Reverse(kv_cost[i]));
        // 128-row tiles of every sequence longer than 64, then the short and packed tiles of
        // the 64-row list (cost 1, so they stay last); `auto_wide` keeps the long ones.
        for (t, &c) in q_tiles.iter().zip(&q_cost) {
            if t[1] as usize <= TILE {
                wide_tiles.push(*t);
                wide_cost.push(c);
            }
        }
        let mut wi: Vec<usize> = (0..wide_tiles.len()).collect();
        wi.sort_by_key(|&i| std::cmp::Reverse(wide_cost[i]));
        let wide_tiles: Vec<TileDesc> = wi.iter().map(|&i| wide_tiles[i]).collect();
        let q_tiles: Vec<TileDesc> = qi.iter().map(|&i| q_tiles[i]).collect();
        let long = |t: &&TileDesc| t[1] as usize >= AUTO_WIDE_MIN;
        let auto_wide: Vec<TileDesc> = wide_tiles.iter().filter(long).copied().collect();
        let auto_narrow: Vec<TileDesc> = q_tiles.iter().filter(|t| !long(t)).copied().collect();
        let mut kwi: Vec<usize> = (0..kv_wide.len()).collect();
        kwi.sort_by_key(|&i| std::cmp::Reverse(kv_wide_cost[i]));
        let kv_wide: Vec<TileDesc> = kwi.iter().map(|&i| kv_wide[i]).collect();
        let kv_tiles: Vec<TileDesc> = ki.iter().map(|&i| kv_tiles[i]).collect();
        let kv_rest: Vec<TileDesc> = kv_tiles.iter().filter(|t| !long(t)).copied().collect();
        let host = q_tiles
            .iter()
            .chain(kv_tiles.iter())
            .chain(auto_wide.iter())
            .chain(auto_narrow.iter())
            .chain(kv_wide.iter())
            .chain(kv_rest.iter())
            .flatten()
            .copied()
            .chain(segs.iter().copied())
            .collect::<Vec<i32>>();
        Ok(Plan {
            n_tokens,
            seq_lens: cu_seqlens
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .collect(),
            t_pad: pad,
            max_len,
            q_tiles,
            kv_tiles,
            auto_wide,
            auto_narrow,
            kv_wide,
            kv_rest,
            segs,
            host,
            staged: Mutex::new(None),
        })
    }

    /// The longest sequence's length in tokens (0 for an empty batch): whether a sliding window
    /// hides any key (`FlashDims::window_within`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens in sequences of at least `min_len` tokens.
    pub fn long_tokens(&self, min_len: usize) -> usize {
        self.seq_lens.iter().filter(|&&l| l >= min_len).sum()
    }

    /// Query tiles (64 rows each) in launch order.
    pub fn q_tiles(&self) -> &[TileDesc] {
        &self.q_tiles
    }

    /// Key tiles (64 rows each) in launch order.
    pub fn kv_tiles(&self) -> &[TileDesc] {
        &self.kv_tiles
    }

    /// Rows of the padded scratch layout (every sequence rounded up to whole tiles).
    pub fn padded_tokens(&self) -> usize {
        self.t_pad
    }

    /// Byte offset and length (tiles) of one list in the workspace.
    pub(crate) fn list(&self, lay: &WorkspaceLayout, tiles: Tiles) -> (usize, usize) {
        match tiles {
            Tiles::Query => (lay.tiles, self.q_tiles.len()),
            Tiles::QueryLong128 => (lay.auto_wide, self.auto_wide.len()),
            Tiles::QueryShort => (lay.auto_narrow, self.auto_narrow.len()),
            Tiles::Keys => (lay.kv_tiles, self.kv_tiles.len()),
            Tiles::KeysLong128 => (lay.kv_wide, self.kv_wide.len()),
            Tiles::KeysShort => (lay.kv_rest, self.kv_rest.len()),
        }
    }

    pub(crate) fn layout(&self, n_heads: usize) -> WorkspaceLayout {
        let tiles = 0;
        let kv_tiles = 16 * self.q_tiles.len();
        let auto_wide = kv_tiles + 16 * self.kv_tiles.len();
        let auto_narrow = auto_wide + 16 * self.auto_wide.len();
        let kv_wide = auto_narrow + 16 * self.auto_narrow.len();
        let kv_rest = kv_wide + 16 * self.kv_wide.len();
        let segs = kv_rest + 16 * self.kv_rest.len();
        let lse2 = align256(segs + 4 * self.segs.len());
        let d = align256(lse2 + 4 * n_heads * self.t_pad);
        let total = align256(d + 4 * n_heads * self.t_pad).max(256);
        WorkspaceLayout {
            tiles,
            kv_tiles,
            auto_wide,
            auto_narrow,
            kv_wide,
            kv_rest,
            segs,
            lse2,
            d,
            total,
        }
    }

    /// Copy the tile lists to the workspace (device address `dst`) on `stream`, from
    /// page-locked memory borrowed from `pool` on the first call, so the copy is truly async.
    ///
    /// # Safety
    /// `dst` is a device allocation of at least `4 * host.len()` bytes on `stream`'s context.
    pub(crate) unsafe fn upload(
        &self,
        pool: &Arc<StagingPool>,
        stream: &CudaStream,
        dst: u64,
    ) -> Result<(), FlashError> {
        if self.host.is_empty() {
            return Ok(());
        }
        let mut staged = self.staged.lock().expect("plan staging mutex poisoned");
        if staged.is_none() {
            *staged = Some((pool.clone(), pool.take(stream.context(), &self.host)?));
        }
        match staged.as_ref() {
            Some((_, buf)) => buf.upload(stream, dst),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(n: usize, s: usize, max: usize) -> FlashDims {
        FlashDims {
            n,
            n_seqs: s,
            max_seqlen: max,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 64,
            scale: 0.125,
            window: None,
        }
    }

    #[test]
    fn every_row_is_covered_once_and_lists_are_sorted() {
        let lens = [
            1usize, 0, 64, 65, 200, 0, 3, 129, 30, 0, 600, 30, 5, 2, 70, 1, 1,
        ];
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().copied().unwrap_or(0) + l as i32);
        }
        let n = *cu.last().unwrap_or(&0) as usize;
        let plan = Plan::new(&cu, &dims(n, lens.len(), 600)).expect("valid plan");
        let seq_start = |t: usize| cu[cu.partition_point(|&c| c as usize <= t) - 1];
        let mut seen = vec![0u32; n];
        let mut packed = 0;
        for t in plan.q_tiles() {
            let m = t[2].max(0);
            for r in 0..TILE as i32 {
                let i = m * TILE as i32 + r;
                if i < t[1] {
                    let row = (t[0] + i) as usize;
                    seen[row] += 1;
                    let start = if t[2] < 0 {
                        t[0] + plan.segs[(-t[2] - 1) as usize * TILE + r as usize]
                    } else {
                        t[0]
                    };
                    assert_eq!(start, seq_start(row), "sequence start of row {row}");
                }
            }
            packed += usize::from(t[2] < 0);
            assert_eq!(t[3] % TILE as i32, 0, "pad_start is tile aligned");
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "each row in exactly one query tile"
        );
        assert!(packed >= 2, "runs of short sequences share tiles");
        let mut auto_seen = vec![0u32; n];
        for (list, rows) in [(&plan.auto_wide, WIDE_TILE), (&plan.auto_narrow, TILE)] {
            for t in list.iter() {
                let rows = if t[1] as usize > TILE { rows } else { TILE };
                for r in 0..rows as i32 {
                    let i = t[2].max(0) * rows as i32 + r;
                    if i < t[1] {
                        auto_seen[(t[0] + i) as usize] += 1;
                    }
                }
            }
        }
        assert!(!plan.auto_wide.is_empty() && !plan.auto_narrow.is_empty());
        // The long/short key lists cover every key row once, too.
        let mut kv_seen = vec![0u32; n];
        for (list, rows) in [(&plan.kv_wide, WIDE_TILE), (&plan.kv_rest, TILE)] {
            for t in list.iter() {
                for r in 0..rows as i32 {
                    let i = t[2].max(0) * rows as i32 + r;
                    if i < t[1] {
                        kv_seen[(t[0] + i) as usize] += 1;
                    }
                }
            }
        }
        assert!(!plan.kv_wide.is_empty() && !plan.kv_rest.is_empty());
        assert!(
            kv_seen.iter().all(|&c| c == 1),
            "each key row in exactly one long/short backward key tile"
        );
        let cost = |t: &TileDesc, rows: i32| (t[1] + rows - 1) / rows - t[2].max(0);
        let rest: Vec<i32> = plan.kv_rest.iter().map(|t| cost(t, TILE as i32)).collect();
        assert!(
            rest.windows(2).all(|w| w[0] >= w[1]),
            "kv_rest longest first: {rest:?}"
        );
        let wide: Vec<i32> = plan
            .kv_wide
            .iter()
            .map(|t| (t[1] + 63) / 64 - 2 * t[2])
            .collect();
        assert!(
            wide.windows(2).all(|w| w[0] >= w[1]),
            "kv_wide longest first: {wide:?}"
        );
        assert!(
            auto_seen.iter().all(|&c| c == 1),
            "each row in exactly one auto tile"
        );
        let costs: Vec<i32> = plan.q_tiles().iter().map(|t| t[2].max(0) + 1).collect();
        assert!(
            costs.windows(2).all(|w| w[0] >= w[1]),
            "longest first: {costs:?}"
        );
        let kcost: Vec<i32> = plan
            .kv_tiles()
            .iter()
            .map(|t| (t[1] + TILE as i32 - 1) / TILE as i32 - t[2].max(0))
            .collect();
        assert!(
            kcost.windows(2).all(|w| w[0] >= w[1]),
            "key tiles longest first: {kcost:?}"
        );
        // Sequences longer than a tile are padded to whole tiles, each packed or short tile is one.
        let long: usize = lens
            .iter()
            .filter(|&&l| l > TILE)
            .map(|l| l.div_ceil(TILE) * TILE)
            .sum();
        let short = plan
            .q_tiles()
            .iter()
            .filter(|t| t[1] as usize <= TILE)
            .count()
            * TILE;
        assert_eq!(plan.padded_tokens(), long + short);
    }

    #[test]
    fn workspace_sections_are_ordered_aligned_and_sized() {
        let cu = [0i32, 5, 5, 70, 300, 301];
        let plan = Plan::new(&cu, &dims(301, 5, 300)).expect("valid plan");
        let h = 4;
        let l = plan.layout(h);
        let tiles_end = l.segs + 4 * plan.segs.len();
        assert_eq!(l.kv_tiles, 16 * plan.q_tiles().len());
        assert_eq!(l.auto_wide, l.kv_tiles + 16 * plan.kv_tiles().len());
        assert_eq!(l.auto_narrow, l.auto_wide + 16 * plan.auto_wide.len());
        assert_eq!(l.kv_wide, l.auto_narrow + 16 * plan.auto_narrow.len());
        assert_eq!(l.kv_rest, l.kv_wide + 16 * plan.kv_wide.len());
        assert_eq!(l.segs, l.kv_rest + 16 * plan.kv_rest.len());
        assert!(tiles_end <= l.lse2 && l.lse2.is_multiple_of(256));
        assert_eq!(
            l.d - l.lse2,
            (4 * h * plan.padded_tokens()).div_ceil(256) * 256
        );
        assert!(l.total >= l.d + 4 * h * plan.padded_tokens() && l.total.is_multiple_of(256));
        assert_eq!(
            plan.host.len() * 4,
            tiles_end,
            "uploaded bytes = tile sections"
        );
    }

    /// The window does not enter the plan: the same lists and layout with any window, so one
    /// plan serves a model's windowed and full layers; `max_len` tells whether it hides keys.
    #[test]
    fn the_plan_does_not_depend_on_the_window() {
        let cu = [0i32, 5, 5, 70, 300, 301];
        let plain = Plan::new(&cu, &dims(301, 5, 300)).expect("valid plan");
        assert_eq!(plain.max_len(), 230);
        for w in [1, 3, 64, 229, 230, 4096] {
            let d = FlashDims {
                window: Some(w),
                ..dims(301, 5, 300)
            };
            let p = Plan::new(&cu, &d).expect("valid plan");
            assert_eq!(p.host, plain.host, "window {w}");
            assert_eq!(p.layout(4), plain.layout(4), "window {w}");
            assert_eq!(
                d.window_within(p.max_len()).is_some(),
                w < 230,
                "window {w}"
            );
        }
        assert_eq!(Plan::new(&[0], &dims(0, 0, 0)).expect("empty").max_len(), 0);
    }

    #[test]
    fn rejects_bad_cu_seqlens() {
        assert!(Plan::new(&[0, 5, 3], &dims(3, 2, 8)).is_err());
        assert!(Plan::new(&[1, 5], &dims(5, 1, 8)).is_err());
        assert!(Plan::new(&[0, 5], &dims(6, 1, 8)).is_err());
        assert!(Plan::new(&[0, 9], &dims(9, 1, 8)).is_err());
        assert!(Plan::new(&[0, 0, 0], &dims(0, 2, 8)).is_ok());
    }
}
