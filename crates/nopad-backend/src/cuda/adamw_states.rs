//! Launcher of the `adamw_q_*` kernels of `adamw.cu`: the AdamW step with the moments in bf16 or
//! block-wise 8-bit codes, or the weights rounded stochastically to bf16 without a master copy
//! (`OptimizerOps::adamw_states`). fp32 moments rounded to nearest go to `adamw_impl` unchanged.
//!
//! The kernels run one thread per element and one CUDA block of 256 threads per quantisation
//! block (every mode, so one kernel body serves all); the 8-bit code maps are built on the host
//! (`crate::codes::code_map`) and passed by value in the launch parameters, from which each
//! block copies them to shared memory.

use super::adamw::AdamwParams;
use super::compile::ADAMW;
use super::elementwise::stride_launch;
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
        let g16 = if self.grad == Dtype::Bf16 { "_g16" } else { "" };
        let name = format!("adamw_q_{mom}_{w}{g16}");
        // One 256-thread block per quantisation block (grid-stride beyond the grid cap).
        let cfg = stride_launch(n);
        // SAFETY: every pointer was checked above for its type and length n (scales n/256);
        // the kernel does scalar accesses only, so any element alignment is fine.
        unsafe { self.launch(ADAMW, self.compute, &name, cfg, &p) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn launch_parameters_fit_and_match_the_kernel_layout() {
        // 80 bytes of AdamwParams, four u64, two maps: the size adamw.cu's struct has.
        assert_eq!(
            std::mem::size_of::<super::AdamwStatesParams>(),
            80 + 32 + 2048
        );
        assert!(std::mem::size_of::<super::AdamwStatesParams>() <= 4096);
    }
}
