//! Launcher of the `adamw_q_*` kernels of `adamw.cu`: the AdamW step with the moments in bf16 or
//! block-wise 8-bit codes, or the weights rounded stochastically to bf16 without a master copy
//! (`OptimizerOps::adamw_states`). fp32 moments rounded to nearest go to `adamw_impl` unchanged.
//!
//! Each mode has two kernels that store the same bits: `*_v8`, 8 consecutive elements per
//! thread with 16-byte accesses and one warp per quantisation block of 256, taken when every
//! pointer is 16-byte aligned; and one thread per element with one CUDA block of 256 threads per
//! quantisation block, for views that start at any element. One kernel body per form serves
//! every mode; the 8-bit code maps are built on the host (`crate::codes::code_map`) and passed
//! by value in the launch parameters, from which each block copies them to shared memory.

use super::adamw::AdamwParams;
use super::compile::{Launch, ADAMW};
use super::elementwise::{stride_launch, v8_ok};
use super::{want, Cuda, Dtype};
use crate::codes::{code_map, sr_key, QUANT_BLOCK};
use crate::error::check;
use crate::{AdamWStates, AdamWStep, MomentMut, ParamRounding, Result, StatePrecision};

/// Mirrors `AdamwStatesParams` in adamw.cu (2,160 bytes, within the 4 KiB of launch parameters).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamwStatesParams {
    a: AdamwParams,
    m_scale: u64,
    v_scale: u64,
    sr_key: u64,
    sr_base: u64,
    map_m: [f32; 256],
    map_v: [f32; 256],
}

/// The kernel (without its element-type suffix) and grid for `n` elements at the five addresses
/// of `ptrs` (param, master or 0, grad, m, v; scales are read one at a time): the `_v8` form,
/// one warp per quantisation block, when every address is 16-byte aligned (the 8-wide accesses
/// need it; any n), else one thread per element (grid-stride beyond the grid cap either way).
fn kernel(
    (mom, w, g16): (&str, &str, bool),
    ptrs: &[u64; 5],
    n: usize,
    allow_v8: bool,
) -> (String, Launch) {
    let g16 = if g16 { "_g16" } else { "" };
    if allow_v8 && v8_ok(ptrs, &[]) {
        let warps = n.div_ceil(QUANT_BLOCK) * 32;
        (format!("adamw_q_{mom}_{w}_v8{g16}"), stride_launch(warps))
    } else {
        (format!("adamw_q_{mom}_{w}{g16}"), stride_launch(n))
    }
}

/// The pointers of one moment view: (values, scales or 0).
fn moment_ptrs(
    op: &'static str,
    name: &str,
    mom: &MomentMut<'_, Cuda>,
    n: usize,
) -> Result<(u64, u64)> {
    match mom {
        MomentMut::F32(x) => want(op, name, x, Dtype::F32, n).map(|_| (x.ptr, 0)),
        MomentMut::Bf16(x) => want(op, name, x, Dtype::Bf16, n).map(|_| (x.ptr, 0)),
        MomentMut::Block8 { codes, scales } => {
            want(op, name, codes, Dtype::U8, n)?;
            want(op, "scales", scales, Dtype::F32, n.div_ceil(QUANT_BLOCK))?;
            Ok((codes.ptr, scales.ptr))
        }
    }
}

impl Cuda {
    /// param: `[n]` Compute; master: `[n]` U16 low halves (bf16 mode, rounding to nearest);
    /// grad: `[n]` of the gradient type; m, v: `[n]` fp32, bf16, or u8 codes with `[n/256]`
    /// fp32 scales.
    pub(crate) fn adamw_states_impl(&self, a: AdamWStates<'_, Self>) -> Result<()> {
        self.states_update(a, true)
    }

    /// [`Cuda::adamw_states_impl`], with the `_v8` kernels allowed or not (the tests compare
    /// the two forms).
    fn states_update(&self, a: AdamWStates<'_, Self>, allow_v8: bool) -> Result<()> {
        let precision = a.precision()?;
        let op = "adamw_states";
        let AdamWStates {
            param,
            master,
            grad,
            m,
            v,
            n,
            hp,
            rounding,
        } = a;
        let (m, v) = match (m, v, rounding) {
            // The default path, untouched.
            (MomentMut::F32(m), MomentMut::F32(v), ParamRounding::Nearest) => {
                return self.adamw_impl(AdamWStep {
                    param,
                    master,
                    grad,
                    m,
                    v,
                    n,
                    hp,
                })
            }
            (m, v, _) => (m, v),
        };
        want(op, "param", &param, self.compute, n)?;
        want(op, "grad", &grad, self.grad, n)?;
        if let Some(master) = &master {
            check(self.compute == Dtype::Bf16, op, || {
                "a master copy is kept only in bf16 mode".into()
            })?;
            check(rounding == ParamRounding::Nearest, op, || {
                "stochastic rounding replaces the master copy: pass no master".into()
            })?;
            want(op, "master", master, Dtype::U16, n)?;
        }
        check(hp.step >= 1, op, || "step is 1-based".into())?;
        let (m_ptr, m_scale) = moment_ptrs(op, "m", &m, n)?;
        let (v_ptr, v_scale) = moment_ptrs(op, "v", &v, n)?;
        if n == 0 {
            return Ok(());
        }
        let (w, (key, base)) = match (&master, rounding) {
            (Some(_), _) => ("split", (0, 0)),
            (None, ParamRounding::Nearest) => ("plain", (0, 0)),
            (None, ParamRounding::Stochastic { seed, first_index }) => {
                ("sr", (sr_key(seed, hp.step), first_index))
            }
        };
        let mom = match precision {
            StatePrecision::F32 => "f32",
            StatePrecision::Bf16 => "bf16",
            StatePrecision::Block8 => "q8",
        };
        let ptrs = [
            param.ptr,
            master.as_ref().map_or(0, |m| m.ptr),
            grad.ptr,
            m_ptr,
            v_ptr,
        ];
        let p = AdamwStatesParams {
            a: AdamwParams::new(ptrs, n, &hp),
            m_scale,
            v_scale,
            sr_key: key,
            sr_base: base,
            map_m: code_map(true),
            map_v: code_map(false),
        };
        let (name, cfg) = kernel((mom, w, self.grad == Dtype::Bf16), &ptrs, n, allow_v8);
        // SAFETY: every pointer was checked above for its type and length n (scales n/256);
        // the _v8 kernels only with 16-byte aligned pointers, the others do scalar accesses.
        unsafe { self.launch(ADAMW, self.compute, &name, cfg, &p) }
    }
}

#[cfg(test)]
mod tests {
    use super::kernel;
    use crate::codes::{bf16_bits, QUANT_BLOCK};
    use crate::cuda::{probe, Cuda, CudaBuf, CudaDtype, CudaOptions};
    use crate::prelude::*;
    use nopad_rng::Rng;
    use std::io::Write;

    #[test]
    fn launch_parameters_fit_and_match_the_kernel_layout() {
        // 80 bytes of AdamwParams, four u64, two maps: the size adamw.cu's struct has.
        assert_eq!(
            std::mem::size_of::<super::AdamwStatesParams>(),
            80 + 32 + 2048
        );
        assert!(std::mem::size_of::<super::AdamwStatesParams>() <= 4096);
    }

    #[test]
    fn the_8_wide_kernels_run_on_aligned_views_with_a_warp_per_block() {
        let aligned = [0x1000, 0, 0x2000, 0x3000, 0x4000];
        for (n, ctas) in [(1, 1), (256, 1), (257, 1), (8 * 256, 1), (8 * 256 + 1, 2)] {
            let (name, cfg) = kernel(("q8", "split", true), &aligned, n, true);
            assert_eq!(name, "adamw_q_q8_split_v8_g16");
            assert_eq!((cfg.grid.0, cfg.block), (ctas, 256), "n = {n}");
        }
        // The grid is capped; the kernel strides over the rest.
        let (_, cfg) = kernel(("bf16", "sr", false), &aligned, 1 << 30, true);
        assert_eq!(cfg.grid.0, 132 * 16);
        // A view starting at any element of any state, or the forms compared: one element a
        // thread.
        for k in 0..5 {
            let mut ptrs = aligned;
            ptrs[k] += [2, 2, 4, 1, 8][k];
            let (name, cfg) = kernel(("q8", "plain", false), &ptrs, 1000, true);
            assert_eq!((name.as_str(), cfg.grid.0), ("adamw_q_q8_plain", 4));
        }
        let (name, _) = kernel(("bf16", "split", true), &aligned, 1000, false);
        assert_eq!(name, "adamw_q_bf16_split_g16");
    }

    /// A state's contents as bits (NaN payloads included).
    fn bits(d: &StateData) -> (Vec<u32>, Vec<u32>) {
        match d {
            StateData::F32(x) => (x.iter().map(|v| v.to_bits()).collect(), vec![]),
            StateData::Bf16(x) => (x.iter().map(|&v| v as u32).collect(), vec![]),
            StateData::Block8 { codes, scales } => (
                codes.iter().map(|&c| c as u32).collect(),
                scales.iter().map(|v| v.to_bits()).collect(),
            ),
        }
    }

    /// Random states of `n` moments, with a block whose values are all 0 (scale 0) when there
    /// is a second block.
    fn state(rng: &mut Rng, precision: StatePrecision, n: usize, signed: bool) -> StateData {
        let mut draw = || {
            let x = rng.normal() as f32 * if signed { 0.1 } else { 0.01 };
            if signed {
                x
            } else {
                x.abs()
            }
        };
        match precision {
            StatePrecision::F32 => StateData::F32((0..n).map(|_| draw()).collect()),
            StatePrecision::Bf16 => StateData::Bf16((0..n).map(|_| bf16_bits(draw())).collect()),
            StatePrecision::Block8 => {
                let mut scales: Vec<f32> = (0..n.div_ceil(QUANT_BLOCK))
                    .map(|_| draw().abs() * 3.0)
                    .collect();
                if scales.len() > 1 {
                    scales[1] = 0.0;
                }
                StateData::Block8 {
                    codes: (0..n).map(|_| (rng.next_u64() >> 56) as u8).collect(),
                    scales,
                }
            }
        }
    }

    /// One update on the device, by the 8-wide kernels or not: the weights (fp32 master or the
    /// parameters) and both moments, as bits.
    fn update(
        b: &Cuda,
        (precision, rounding): (StatePrecision, ParamRounding),
        (p, g, m, v): (&[f32], &[f32], &StateData, &StateData),
        allow_v8: bool,
    ) -> Vec<Vec<u32>> {
        let n = p.len();
        let up = |x: &[f32], kind| -> CudaBuf {
            let mut buf = b.alloc(n, kind).unwrap();
            b.write(&mut buf, 0, x).unwrap();
            buf
        };
        let (mut param, grad) = (up(p, Kind::Compute), up(g, Kind::Grad));
        let split = b.needs_master() && rounding == ParamRounding::Nearest;
        let mut master = split.then(|| {
            let mut lo = b.master_new(&param, n).unwrap();
            b.master_write(&mut param, &mut lo, 0, p).unwrap();
            lo
        });
        let mut s = AdamWState::new(b, n, precision).unwrap();
        s.write(b, Moment::First, 0, m).unwrap();
        s.write(b, Moment::Second, 0, v).unwrap();
        let (mv, vv) = s.views(b, 0..n).unwrap();
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 7,
            grad_scale: 0.5,
        };
        let a = AdamWStates {
            param: b.view_mut(&mut param, 0..n),
            master: master.as_mut().map(|lo| b.view_mut(lo, 0..n)),
            grad: b.view(&grad, 0..n),
            m: mv,
            v: vv,
            n,
            hp,
            rounding,
        };
        b.states_update(a, allow_v8).unwrap();
        let w = match &master {
            Some(lo) => b.master_read(&param, lo, 0..n).unwrap(),
            None => b.read(&param, 0..n).unwrap(),
        };
        let (m0, m1) = bits(&s.read(b, Moment::First, 0..n).unwrap());
        let (v0, v1) = bits(&s.read(b, Moment::Second, 0..n).unwrap());
        vec![w.iter().map(|x| x.to_bits()).collect(), m0, m1, v0, v1]
    }

    #[test]
    fn the_8_wide_kernels_store_the_bits_of_the_one_element_kernels() {
        if let Err(reason) = probe() {
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({reason})");
            return;
        }
        let mut rng = Rng::new(29);
        for (dtype, bf16_grads) in [
            (CudaDtype::F32, false),
            (CudaDtype::Bf16, false),
            (CudaDtype::Bf16, true),
        ] {
            let opts = CudaOptions {
                dtype,
                bf16_grads,
                ..CudaOptions::default()
            };
            let b = Cuda::new(opts).unwrap();
            // fp32 moments rounded to nearest are adamw.cu's first kernels, not these.
            let modes = [
                StatePrecision::Bf16,
                StatePrecision::Block8,
                StatePrecision::F32,
            ]
            .into_iter()
            .flat_map(|p| [(p, true), (p, false)])
            .filter(|&(p, sr)| sr || p != StatePrecision::F32);
            for (precision, stochastic) in modes {
                // Short, a partial last block, a thread's tail, more blocks than the capped
                // grid has warps.
                for n in [1, 7, 300, 8 * 256 + 13, (132 * 16 + 3) * 8 * 256 + 5] {
                    let rounding = if stochastic {
                        ParamRounding::Stochastic {
                            seed: rng.next_u64(),
                            first_index: 12_345,
                        }
                    } else {
                        ParamRounding::Nearest
                    };
                    let p: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                    let mut g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                    // A zero block (with its zero scales), and a NaN the block maxima skip.
                    g.iter_mut()
                        .skip(QUANT_BLOCK)
                        .take(QUANT_BLOCK)
                        .for_each(|x| *x = 0.0);
                    if n > 600 {
                        g[600] = f32::NAN;
                    }
                    let (m, v) = (
                        state(&mut rng, precision, n, true),
                        state(&mut rng, precision, n, false),
                    );
                    let x = (p.as_slice(), g.as_slice(), &m, &v);
                    let mode = (precision, rounding);
                    let wide = update(&b, mode, x, true);
                    let one = update(&b, mode, x, false);
                    let what = ["weights", "m", "m scales", "v", "v scales"];
                    for ((w, o), what) in wide.iter().zip(&one).zip(what) {
                        let differ = w.iter().zip(o).position(|(a, b)| a != b);
                        assert!(
                            differ.is_none(),
                            "{dtype:?} bf16_grads={bf16_grads} {precision:?} sr={stochastic} \
                             n={n}: {what} differ first at {differ:?}"
                        );
                    }
                }
            }
        }
    }
}
