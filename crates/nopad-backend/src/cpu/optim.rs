//! The optimizer on the CPU: AdamW with fp32 moments ([`adamw`], the default path) and with the
//! moments in any [`StatePrecision`] and stochastic rounding of the weights ([`adamw_states`]).
//! Both run one element update ([`Coef::update`]: the arithmetic, in the order, of
//! torch.optim.AdamW and of `cuda/adamw.cu`); the state formats come from [`crate::codes`], so
//! `Cpu<f32>` is the reference of the CUDA kernels.
//!
//! On the CPU every state is a scalar-type value: bf16 moments are kept bf16-representable
//! (rounded as they are stored), 8-bit codes are the numbers 0..=255, scales are f32 values
//! (rounded so on `Cpu<f64>`). In `Cpu<f64>` the f64 results are first rounded to f32 before
//! the bf16, code or stochastic rounding, so the states read back as f32 exactly.

use rayon::prelude::*;

use super::{check_len, Cpu, Scalar, ROW_CHUNK};
use crate::codes::{
    code_map, nearest_code, round_bf16, round_bf16_stochastic, sr_key, QUANT_BLOCK,
};
use crate::error::check;
use crate::{AdamW, AdamWStates, AdamWStep, MomentMut, ParamRounding, Result};

/// Elements per parallel task: whole quantisation blocks, fixed so results never depend on the
/// thread count.
const CHUNK: usize = ROW_CHUNK * 64;
const _: () = assert!(CHUNK.is_multiple_of(QUANT_BLOCK));

/// The per-step constants of the AdamW update, in the scalar type.
struct Coef<T> {
    b1: T,
    b2: T,
    eps: T,
    gs: T,
    bc2_sqrt: T,
    step_size: T,
    decay: T,
}

impl<T: Scalar> Coef<T> {
    fn new(hp: &AdamW) -> Self {
        let f = |x: f32| T::from_f64(x as f64);
        let lr = f(hp.lr);
        let bc1 = T::ONE - T::from_f64((hp.beta1 as f64).powi(hp.step as i32));
        Coef {
            b1: f(hp.beta1),
            b2: f(hp.beta2),
            eps: f(hp.eps),
            gs: f(hp.grad_scale),
            bc2_sqrt: (T::ONE - T::from_f64((hp.beta2 as f64).powi(hp.step as i32))).sqrt(),
            step_size: lr / bc1,
            decay: T::ONE - lr * f(hp.weight_decay),
        }
    }

    /// One element: the same arithmetic, in the same order, as torch.optim.AdamW (non-fused).
    #[inline]
    fn update(&self, g: T, p: &mut T, m: &mut T, v: &mut T) {
        let gi = g * self.gs;
        *p *= self.decay;
        *m = *m * self.b1 + gi * (T::ONE - self.b1);
        *v = *v * self.b2 + gi * gi * (T::ONE - self.b2);
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p -= self.step_size * *m / denom;
    }
}

/// The default update: fp32 (scalar-type) moments, the weights in their own type.
pub(crate) fn adamw<T: Scalar>(a: AdamWStep<'_, Cpu<T>>) -> Result<()> {
    let (param, grad, m, v, n, hp) = (a.param, a.grad, a.m, a.v, a.n, a.hp);
    check(a.master.is_none(), "adamw", || {
        "the CPU backend keeps no master copy".into()
    })?;
    for (name, len) in [
        ("param", param.len()),
        ("grad", grad.len()),
        ("m", m.len()),
        ("v", v.len()),
    ] {
        check_len("adamw", name, len, n)?;
    }
    check(hp.step >= 1, "adamw", || "step numbers start at 1".into())?;
    let c = Coef::new(&hp);
    param[..n]
        .par_chunks_mut(CHUNK)
        .zip(grad[..n].par_chunks(CHUNK))
        .zip(m[..n].par_chunks_mut(CHUNK))
        .zip(v[..n].par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                c.update(g[i], &mut p[i], &mut m[i], &mut v[i]);
            }
        });
    Ok(())
}

/// One moment's part of a [`CHUNK`], as stored.
enum Part<'a, 'm, T> {
    Plain(&'a mut [T]),
    Bf16(&'a mut [T]),
    Block8 {
        codes: &'a mut [T],
        scales: &'a mut [T],
        map: &'m [f32; 256],
    },
}

impl<T: Scalar> Part<'_, '_, T> {
    /// The values of block `b` of the part (elements `256·b..`), into `out`.
    fn load(&self, b: usize, out: &mut [T]) {
        let at = b * QUANT_BLOCK..b * QUANT_BLOCK + out.len();
        match self {
            Part::Plain(x) | Part::Bf16(x) => out.copy_from_slice(&x[at]),
            Part::Block8 { codes, scales, map } => {
                for (o, &c) in out.iter_mut().zip(&codes[at]) {
                    let code = (c.to_f32() as usize).min(255);
                    *o = T::from_f32(map[code]) * scales[b];
                }
            }
        }
    }

    /// Stores the updated values of block `b`: bf16 rounded to nearest even; 8-bit with the new
    /// scale (the largest magnitude, as f32) and each value's nearest code of value/scale.
    fn store(&mut self, b: usize, vals: &[T]) {
        let at = b * QUANT_BLOCK..b * QUANT_BLOCK + vals.len();
        match self {
            Part::Plain(x) => x[at].copy_from_slice(vals),
            Part::Bf16(x) => {
                for (d, &v) in x[at].iter_mut().zip(vals) {
                    *d = T::from_f32(round_bf16(v.to_f32()));
                }
            }
            Part::Block8 { codes, scales, map } => {
                let absmax = vals
                    .iter()
                    .fold(T::ZERO, |a, &x| a.max(if x < T::ZERO { -x } else { x }));
                let scale = T::from_f32(absmax.to_f32());
                for (d, &v) in codes[at].iter_mut().zip(vals) {
                    let x = if scale > T::ZERO {
                        (v / scale).to_f32()
                    } else {
                        0.0
                    };
                    *d = T::from_f32(nearest_code(map, x) as f32);
                }
                scales[b] = scale;
            }
        }
    }
}

/// Checks a moment's lengths and cuts it into [`CHUNK`]s.
fn parts<'a, 'm, T: Scalar>(
    name: &'static str,
    mom: MomentMut<'a, Cpu<T>>,
    n: usize,
    map: &'m [f32; 256],
) -> Result<Vec<Part<'a, 'm, T>>> {
    let op = "adamw_states";
    Ok(match mom {
        MomentMut::F32(x) => {
            check_len(op, name, x.len(), n)?;
            x[..n].chunks_mut(CHUNK).map(Part::Plain).collect()
        }
        MomentMut::Bf16(x) => {
            check_len(op, name, x.len(), n)?;
            x[..n].chunks_mut(CHUNK).map(Part::Bf16).collect()
        }
        MomentMut::Block8 { codes, scales } => {
            check_len(op, name, codes.len(), n)?;
            check_len(op, "scales", scales.len(), n.div_ceil(QUANT_BLOCK))?;
            codes[..n]
                .chunks_mut(CHUNK)
                .zip(scales.chunks_mut(CHUNK / QUANT_BLOCK))
                .map(|(codes, scales)| Part::Block8 { codes, scales, map })
                .collect()
        }
    })
}

/// The update with moments in any precision (see [`AdamWStates`]); fp32 moments rounded to
/// nearest go through [`adamw`].
pub(crate) fn adamw_states<T: Scalar>(a: AdamWStates<'_, Cpu<T>>) -> Result<()> {
    a.precision()?;
    check(a.master.is_none(), "adamw_states", || {
        "the CPU backend keeps no master copy".into()
    })?;
    let (param, grad, m, v, n, hp, rounding) = (a.param, a.grad, a.m, a.v, a.n, a.hp, a.rounding);
    let sr = match rounding {
        ParamRounding::Nearest => None,
        ParamRounding::Stochastic { seed, first_index } => {
            Some((sr_key(seed, hp.step), first_index))
        }
    };
    match (m, v, sr) {
        (MomentMut::F32(m), MomentMut::F32(v), None) => adamw(AdamWStep {
            param,
            master: None,
            grad,
            m,
            v,
            n,
            hp,
        }),
        (m, v, sr) => adamw_low(param, grad, (m, v), n, &hp, sr),
    }
}

/// [`adamw_states`] past the dispatch: `sr` is the stochastic-rounding key and the index of the
/// view's first element, or None to keep the weights in their type.
fn adamw_low<T: Scalar>(
    param: &mut [T],
    grad: &[T],
    (m, v): (MomentMut<'_, Cpu<T>>, MomentMut<'_, Cpu<T>>),
    n: usize,
    hp: &AdamW,
    sr: Option<(u64, u64)>,
) -> Result<()> {
    let op = "adamw_states";
    check_len(op, "param", param.len(), n)?;
    check_len(op, "grad", grad.len(), n)?;
    check(hp.step >= 1, op, || "step numbers start at 1".into())?;
    let (map_m, map_v) = (code_map(true), code_map(false));
    let jobs: Vec<_> = param[..n]
        .chunks_mut(CHUNK)
        .zip(grad[..n].chunks(CHUNK))
        .zip(parts("m", m, n, &map_m)?)
        .zip(parts("v", v, n, &map_v)?)
        .enumerate()
        .collect();
    let c = Coef::new(hp);
    jobs.into_par_iter()
        .for_each(|(chunk, (((p, g), mut mp), mut vp))| {
            let (mut mb, mut vb) = ([T::ZERO; QUANT_BLOCK], [T::ZERO; QUANT_BLOCK]);
            for (b, start) in (0..p.len()).step_by(QUANT_BLOCK).enumerate() {
                let len = (p.len() - start).min(QUANT_BLOCK);
                let (mb, vb) = (&mut mb[..len], &mut vb[..len]);
                mp.load(b, mb);
                vp.load(b, vb);
                for k in 0..len {
                    let i = start + k;
                    c.update(g[i], &mut p[i], &mut mb[k], &mut vb[k]);
                    if let Some((key, first)) = sr {
                        let index = first + (chunk * CHUNK + i) as u64;
                        p[i] = T::from_f32(round_bf16_stochastic(p[i].to_f32(), key, index));
                    }
                }
                mp.store(b, mb);
                vp.store(b, vb);
            }
        });
    Ok(())
}

#[cfg(test)]
#[path = "optim_tests.rs"]
mod tests;
