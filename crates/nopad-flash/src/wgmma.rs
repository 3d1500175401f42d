//! Self-test of the warpgroup-MMA operand layouts that the `wgmma.cuh` kernels rely on: the
//! shared-memory descriptors (128-byte swizzle, K-major and MN-major, one and two 64-wide
//! blocks) are checked against CPU products before any attention number is trusted.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use crate::error::driver as drv;
use crate::module::SMEM_WG_SELFTEST;
use crate::{FlashAttention, FlashError};

impl FlashAttention {
    /// Whether the route uses the wgmma kernels (compute capability 9.0, sm_90a).
    pub fn has_wgmma(&self) -> bool {
        crate::has_wgmma(self.capability())
    }

    /// Runs `flash_wg_selftest` on random bf16 `x [64][128]`, `y [128][128]` and returns, for
    /// its three products (S-like `x y[0:64]^T`, dV-like `x[:, 0:64]^T y[0:64]`, dQ-like
    /// `x y[:, 64:128]`), max |gpu - cpu| / max |cpu|; `None` without wgmma.
    pub fn wgmma_selftest(
        &self,
        stream: &Arc<CudaStream>,
        seed: u64,
    ) -> Result<Option<[f64; 3]>, FlashError> {
        let Some(func) = self.wg_selftest() else {
            return Ok(None);
        };
        let mut rng = nopad_rng::Rng::derived(seed, "wgmma selftest");
        let mut draw = |n: usize| -> Vec<u16> {
            (0..n)
                .map(|_| half::bf16::from_f64(rng.normal()).to_bits())
                .collect()
        };
        let (x, y) = (draw(64 * 128), draw(128 * 128));
        let dx = stream.clone_htod(&x).map_err(drv("selftest upload"))?;
        let dy = stream.clone_htod(&y).map_err(drv("selftest upload"))?;
        let mut c1 = stream
            .alloc_zeros::<f32>(64 * 64)
            .map_err(drv("selftest alloc"))?;
        let mut c2 = stream
            .alloc_zeros::<f32>(64 * 128)
            .map_err(drv("selftest alloc"))?;
        let mut c3 = stream
            .alloc_zeros::<f32>(64 * 64)
            .map_err(drv("selftest alloc"))?;
        let mut b = stream.launch_builder(func);
        b.arg(&dx).arg(&dy).arg(&mut c1).arg(&mut c2).arg(&mut c3);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: SMEM_WG_SELFTEST as u32,
        };
        // SAFETY: matches `flash_wg_selftest(x, y, c1, c2, c3)` with the sizes above.
        unsafe { b.launch(cfg) }.map_err(drv("launching flash_wg_selftest"))?;
        let got = [
            stream.clone_dtoh(&c1).map_err(drv("selftest download"))?,
            stream.clone_dtoh(&c2).map_err(drv("selftest download"))?,
            stream.clone_dtoh(&c3).map_err(drv("selftest download"))?,
        ];
        let f = |v: u16| half::bf16::from_bits(v).to_f64();
        let xe = |r: usize, c: usize| f(x[r * 128 + c]);
        let ye = |r: usize, c: usize| f(y[r * 128 + c]);
        // (rows, cols, inner, element) of each product.
        type Elem<'a> = Box<dyn Fn(usize, usize, usize) -> f64 + 'a>;
        let products: [(usize, usize, usize, Elem); 3] = [
            (64, 64, 128, Box::new(|i, j, k| xe(i, k) * ye(j, k))),
            (64, 128, 64, Box::new(|i, j, k| xe(k, i) * ye(k, j))),
            (64, 64, 128, Box::new(|i, j, k| xe(i, k) * ye(k, 64 + j))),
        ];
        let mut errs = [0.0; 3];
        for (p, (rows, cols, inner, elem)) in products.iter().enumerate() {
            let (mut max_ref, mut max_err) = (0.0f64, 0.0f64);
            for i in 0..*rows {
                for j in 0..*cols {
                    let want: f64 = (0..*inner).map(|k| elem(i, j, k)).sum();
                    let have = got[p][i * cols + j] as f64;
                    max_ref = max_ref.max(want.abs());
                    max_err = max_err.max((have - want).abs());
                }
            }
            errs[p] = max_err / max_ref.max(1e-30);
        }
        Ok(Some(errs))
    }
}
