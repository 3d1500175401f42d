//! The kernel choice: one pure function from (head dim, device capability) to the launches of
//! the forward and the backward, each naming its kernel and the plan's tile list it walks. The
//! lengths enter through those lists: the plan splits the batch at `plan::AUTO_WIDE_MIN` tokens,
//! and a route sends each part to its kernel (empty lists are skipped at launch).
//!
//! Written in the manner of FlashAttention-3's `hopper/tile_size.h`: every default is a line of
//! the table in [`route`], and the measurements behind each are in `docs/FLASH.md` section 9.
//! The variants no default path used (the atomic-dQ backward, FA2's mma.sync long-sequence
//! backward, the separate preprocess pass, the scalar kernels, ...) left the crate; the same
//! section names the commit that still has them.
//!
//! A sliding window that hides keys in a batch (some sequence longer than W) takes
//! [`window_route`] on every device: the 64-row mma.sync kernels built with the window (`fwd.cu`,
//! `bwd_dq.cu`, `bwd_dkdv.cu`). The wgmma kernels and the 128-row/128-key tiles have no window
//! and are left alone: one kernel family to get right, and a window keeps every query tile's
//! work bounded (about W / 64 key tiles), which is where the wide tiles gained. A window no
//! sequence exceeds is plain causal attention and keeps [`route`], launches and all.

/// A device's compute capability `(major, minor)`.
pub type Capability = (i32, i32);

/// Whether a device runs the sm_90a kernels (warpgroup MMAs, `wgmma.mma_async`): compute
/// capability 9.0 exactly (sm_90a code does not run on later architectures).
pub fn has_wgmma(cap: Capability) -> bool {
    cap == (9, 0)
}

/// The NVRTC target for a device: `sm_XY`, with the `a` suffix (architecture-specific
/// features, which the wgmma kernels need) from compute capability 9.0 on. The one arch table
/// of the workspace: nopad-backend's loader calls it too.
pub fn arch_for(cap: Capability) -> String {
    let suffix = if cap.0 >= 9 { "a" } else { "" };
    format!("sm_{}{}{}", cap.0, cap.1, suffix)
}

/// One kernel entry point family (`<name>_<Dh>` in the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `fwd.cu` `flash_fwd`: 64 query rows per tile, 4 warps of 16 rows.
    Fwd,
    /// `fwd.cu` `flash_fwd_br128`: 128 query rows per tile, 4 warps of 32 rows.
    FwdWide,
    /// `fwd_wgmma.cu` `flash_fwd_wg`: 64-row tiles on one warpgroup (sm_90a).
    FwdWgmma,
    /// `bwd_dq.cu` `flash_bwd_dq`: dQ over query tiles by recompute, D and lse2 fused.
    BwdDq,
    /// `bwd_dkdv.cu` `flash_bwd_dkdv`: dK, dV over 64-key tiles.
    BwdDkdv,
    /// `bwd_wgmma_short.cu` `flash_bwd_wgs_dq`: `BwdDq` on one warpgroup (sm_90a).
    BwdDqWgmma,
    /// `bwd_wgmma_short.cu` `flash_bwd_wgs_kv`: `BwdDkdv` on one warpgroup (sm_90a).
    BwdDkdvWgmma,
    /// `bwd_wgmma_long.cu` `flash_bwd_wg`: dK, dV over 128-key tiles of long sequences on two
    /// warpgroups (sm_90a, Dh 128 only).
    BwdDkdvLongWgmma,
    /// `fwd.cu` `flash_fwd_win`: `Fwd` with a sliding window (one more parameter, the window).
    FwdWindow,
    /// `bwd_dq.cu` `flash_bwd_dq_win`: `BwdDq` with a sliding window.
    BwdDqWindow,
    /// `bwd_dkdv.cu` `flash_bwd_dkdv_win`: `BwdDkdv` with a sliding window.
    BwdDkdvWindow,
}

impl Kernel {
    /// Whether the kernel takes the sliding window (its last parameter).
    pub fn windowed(self) -> bool {
        matches!(self, FwdWindow | BwdDqWindow | BwdDkdvWindow)
    }

    /// Whether the kernel needs warpgroup MMAs (sm_90a).
    pub fn wgmma(self) -> bool {
        matches!(
            self,
            FwdWgmma | BwdDqWgmma | BwdDkdvWgmma | BwdDkdvLongWgmma
        )
    }
}

/// A tile list of the plan (`plan.rs` builds them; all longest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    /// Every 64-row query tile.
    Query,
    /// 128-row query tiles of the sequences of at least `AUTO_WIDE_MIN` tokens.
    QueryLong128,
    /// 64-row query tiles of the shorter sequences.
    QueryShort,
    /// Every 64-key tile.
    Keys,
    /// 128-key tiles of the sequences of at least `AUTO_WIDE_MIN` tokens.
    KeysLong128,
    /// 64-key tiles of the shorter sequences.
    KeysShort,
}

/// One launch: a kernel over a tile list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The kernel.
    pub kernel: Kernel,
    /// The list it walks (grid = tiles x heads).
    pub tiles: Tiles,
}

#[cfg(test)]
const fn step(kernel: Kernel, tiles: Tiles) -> Step {
    Step { kernel, tiles }
}

/// The launches of one forward and one backward, in order. The backward's first launch
/// computes D = rowsum(dO o O) and lse2 for the later ones (the fused dQ kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Forward launches (they write disjoint rows).
    pub forward: &'static [Step],
    /// Backward launches.
    pub backward: &'static [Step],
}

use Kernel::*;
use Tiles::*;

/// A route's list of steps, each `(kernel, tiles)`.
macro_rules! steps {
    ($(($kernel:expr, $tiles:expr)),* $(,)?) => {
        &[$(Step { kernel: $kernel, tiles: $tiles }),*]
    };
}

/// The route for head dim `head_dim` (64 or 128; anything else is rejected before this) on a
/// device of capability `cap`. The backward is deterministic on every route: dQ by recompute
/// over query tiles, no atomics.
pub fn route(head_dim: usize, cap: Capability) -> Route {
    match (has_wgmma(cap), head_dim) {
        // Hopper, Dh 128: wgmma forward everywhere (runs 7a-7d, 7f); long sequences' dK/dV
        // on 128-key tiles of two warpgroups (run 7a: 15-20% over FA2's mma.sync layout).
        (true, 128) => Route {
            forward: steps![(FwdWgmma, Query)],
            backward: steps![
                (BwdDqWgmma, Query),
                (BwdDkdvLongWgmma, KeysLong128),
                (BwdDkdvWgmma, KeysShort)
            ],
        },
        // Hopper, Dh 64: every key tile on 64-key warpgroup tiles (run 19; there is no 128-key
        // wgmma kernel at Dh 64).
        (true, _) => Route {
            forward: steps![(FwdWgmma, Query)],
            backward: steps![(BwdDqWgmma, Query), (BwdDkdvWgmma, Keys)],
        },
        // mma.sync, Dh 128: 128-row tiles for long sequences (half the shared-memory reads per
        // FLOP), 64-row tiles with masked-block skipping for the rest (run 4a).
        (false, 128) => Route {
            forward: steps![(FwdWide, QueryLong128), (Fwd, QueryShort)],
            backward: steps![(BwdDq, Query), (BwdDkdv, Keys)],
        },
        // mma.sync, Dh 64: the 64-row forward alone measured fastest on every shape (run 4a).
        (false, _) => Route {
            forward: steps![(Fwd, Query)],
            backward: steps![(BwdDq, Query), (BwdDkdv, Keys)],
        },
    }
}

/// The route of a batch in which the sliding window hides keys (some sequence longer than the
/// window), at either head dim and on every device: the mma.sync kernels with the window over
/// the 64-row query and key lists. Their host-built lists are those of plain causal attention
/// (`plan.rs` says why the order stays longest first); each kernel computes the first key tile
/// (forward, dQ) or the last query tile (dK/dV) its window reaches and skips the rest.
pub fn window_route(_head_dim: usize) -> Route {
    Route {
        forward: steps![(FwdWindow, Query)],
        backward: steps![(BwdDqWindow, Query), (BwdDkdvWindow, Keys)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOPPER: Capability = (9, 0);
    const OTHERS: [Capability; 6] = [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0), (7, 5)];

    #[test]
    fn wgmma_only_on_compute_capability_9_0() {
        assert!(has_wgmma(HOPPER));
        for cap in OTHERS.iter().chain(&[(9, 1)]) {
            assert!(!has_wgmma(*cap), "{cap:?}");
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((8, 0)), "sm_80");
        assert_eq!(arch_for((8, 6)), "sm_86");
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((10, 0)), "sm_100a");
        assert_eq!(arch_for((12, 0)), "sm_120a");
    }

    #[test]
    fn hopper_routes_use_the_wgmma_kernels() {
        let r = route(128, HOPPER);
        assert_eq!(r.forward, [step(FwdWgmma, Query)]);
        assert_eq!(
            r.backward,
            [
                step(BwdDqWgmma, Query),
                step(BwdDkdvLongWgmma, KeysLong128),
                step(BwdDkdvWgmma, KeysShort)
            ]
        );
        let r = route(64, HOPPER);
        assert_eq!(r.forward, [step(FwdWgmma, Query)]);
        assert_eq!(
            r.backward,
            [step(BwdDqWgmma, Query), step(BwdDkdvWgmma, Keys)]
        );
    }

    #[test]
    fn other_devices_use_mma_sync() {
        for cap in OTHERS {
            let r = route(128, cap);
            assert_eq!(
                r.forward,
                [step(FwdWide, QueryLong128), step(Fwd, QueryShort)]
            );
            assert_eq!(r.backward, [step(BwdDq, Query), step(BwdDkdv, Keys)]);
            let r = route(64, cap);
            assert_eq!(r.forward, [step(Fwd, Query)]);
            assert_eq!(r.backward, [step(BwdDq, Query), step(BwdDkdv, Keys)]);
        }
    }

    /// Every route covers each query row once in the forward, computes dQ of every query tile
    /// first (it produces D and lse2) and dK/dV of every key tile exactly once after it.
    #[test]
    fn every_route_covers_every_row_once_and_dq_runs_first() {
        for cap in OTHERS.iter().chain(&[HOPPER]) {
            for dh in [64, 128] {
                let r = route(dh, *cap);
                let fwd: Vec<Tiles> = r.forward.iter().map(|s| s.tiles).collect();
                assert!(
                    fwd == [Query] || fwd == [QueryLong128, QueryShort],
                    "{cap:?} {dh}: {fwd:?}"
                );
                assert_eq!(r.backward[0].tiles, Query);
                assert!(matches!(r.backward[0].kernel, BwdDq | BwdDqWgmma));
                let keys: Vec<Tiles> = r.backward[1..].iter().map(|s| s.tiles).collect();
                assert!(
                    keys == [Keys] || keys == [KeysLong128, KeysShort],
                    "{cap:?} {dh}: {keys:?}"
                );
                // The wgmma kernels only where the device has them; the 128-key one at Dh 128.
                let all = r.forward.iter().chain(r.backward);
                for s in all {
                    let wg = matches!(
                        s.kernel,
                        FwdWgmma | BwdDqWgmma | BwdDkdvWgmma | BwdDkdvLongWgmma
                    );
                    assert_eq!(wg, has_wgmma(*cap), "{cap:?} {dh}: {s:?}");
                    assert!(s.kernel != BwdDkdvLongWgmma || dh == 128);
                    assert!(!s.kernel.windowed(), "{cap:?} {dh}: {s:?}");
                }
            }
        }
    }

    /// The windowed route: the three mma.sync kernels with a window, the same list structure
    /// (every query tile once, dQ first, every key tile once after it), no wgmma.
    #[test]
    fn the_window_route_runs_the_windowed_mma_sync_kernels() {
        for dh in [64, 128] {
            let r = window_route(dh);
            assert_eq!(r.forward, [step(FwdWindow, Query)]);
            assert_eq!(
                r.backward,
                [step(BwdDqWindow, Query), step(BwdDkdvWindow, Keys)]
            );
            for s in r.forward.iter().chain(r.backward) {
                assert!(s.kernel.windowed() && !s.kernel.wgmma(), "{s:?}");
            }
        }
    }
}
