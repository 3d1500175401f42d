//! A LoRA model's frozen base in NF4 (QLoRA): each projection matrix of each layer (q, k, v, o,
//! gate, up, down, quantised one HF module at a time as bitsandbytes quantises each `Linear`;
//! [`crate::quant`]) held on the device as packed codes, scale codes and the double
//! quantisation's f32s, and one Compute scratch the size of the largest fused matrix, into which
//! a site's matrices are dequantised (`Ops::dequant_nf4`) just ahead of its GEMM, so that no
//! bf16 copy of the base is alive beyond that one matrix. The model's parameter buffer then
//! holds only what is not quantised (embedding, head, norms, biases): the layout's projection
//! matrices come first in the flat buffer, so the rest is the buffer from the embedding on,
//! viewed through [`param_views`], a copy of the layout shifted down by the projections.

use std::ops::Range;

use nopad_backend::args::DequantNf4;
use nopad_backend::nf4::nf4_lens;
use nopad_backend::{Backend, Kind};

use super::apply::Site;
use super::memory::projection_shapes;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layout::Layout;

/// One quantised matrix on the device.
pub(crate) struct Nf4Buf<B: Backend> {
    n: usize,
    codes: B::Buf,
    scale_codes: B::Buf,
    absmax: B::Buf,
}

/// The NF4 base of a model.
pub(crate) struct Nf4Base<B: Backend> {
    /// Per layer: q, k, v, o, gate, up, down.
    mats: Vec<Vec<Nf4Buf<B>>>,
    /// `[largest fused matrix]` Compute: the matrices of the site in flight.
    scratch: B::Buf,
    /// Where the projection matrices end in the full layout (the embedding's start).
    pub proj_end: usize,
    /// Elements of each of the seven matrices of a layer.
    sizes: [usize; 7],
}

/// `r` shifted down by `by`.
fn shift(r: &Range<usize>, by: usize) -> Range<usize> {
    r.start - by..r.end - by
}

/// The model's layout as an NF4 base's parameter buffer is viewed: every range that is not a
/// projection matrix shifted down by the projections (which come first, `0..proj_end`), and the
/// projection matrices empty (a view of one fails instead of reading other weights).
pub(crate) fn param_views(layout: &Layout) -> Layout {
    let by = layout.embed.start;
    let mut v = layout.clone();
    for l in &mut v.layers {
        // The matrices lie below `by` (the embedding's start): empty; the rest shifted.
        *l = l.map(|r| if r.start < by { 0..0 } else { shift(r, by) });
    }
    v.embed = shift(&v.embed, by);
    v.lm_head = shift(&v.lm_head, by);
    v.norm = shift(&v.norm, by);
    v.total -= by;
    // Nothing reads these through the views: loading goes through the full layout.
    (v.tensors, v.groups, v.decay_end) = (Vec::new(), Vec::new(), 0);
    v
}

impl<B: Backend> Nf4Base<B> {
    /// Allocates the quantised matrices of `cfg` (in the order the memory plan counts them:
    /// `lora::memory::nf4_base_bytes`) and the scratch; `layout` is the model's.
    pub(crate) fn new(b: &B, cfg: &Config, layout: &Layout) -> Result<Self> {
        let sizes = projection_shapes(cfg).map(|(r, c)| r * c);
        let proj_end = layout.embed.start;
        let mats_end = layout
            .layers
            .iter()
            .map(|l| l.down_w.end)
            .max()
            .unwrap_or(0);
        if mats_end > proj_end || layout.tensors.first().map(|t| t.offset) != Some(0) {
            return Err(ModelError::Input(
                "bug: the layout does not put the projection matrices first".into(),
            ));
        }
        let mut mats = Vec::with_capacity(layout.layers.len());
        for _ in &layout.layers {
            let mut layer = Vec::with_capacity(7);
            for n in sizes {
                let (nc, nb, na) = nf4_lens(n);
                layer.push(Nf4Buf {
                    n,
                    codes: b.alloc(nc, Kind::Code8)?,
                    scale_codes: b.alloc(nb, Kind::Code8)?,
                    absmax: b.alloc(na, Kind::Master)?,
                });
            }
            mats.push(layer);
        }
        let [q, k, v, o, g, u, d] = sizes;
        let scratch = b.alloc((q + k + v).max(o).max(g + u).max(d), Kind::Compute)?;
        Ok(Nf4Base {
            mats,
            scratch,
            proj_end,
            sizes,
        })
    }

    /// Writes host values at `offset` of the full layout: projection tensors (which must come
    /// whole, as loading and initialisation hand them over) are quantised, the rest goes into
    /// `params` shifted down.
    pub(crate) fn write(
        &mut self,
        b: &B,
        layout: &Layout,
        params: &mut B::Buf,
        offset: usize,
        vals: &[f32],
    ) -> Result<()> {
        let end = offset + vals.len();
        if offset >= self.proj_end {
            return Ok(b.write(params, offset - self.proj_end, vals)?);
        }
        // Tensors before the embedding are the projections, 7 a layer in layer order.
        for (i, t) in layout.tensors.iter().enumerate() {
            let r = t.range();
            if r.end <= offset || r.start >= end {
                continue;
            }
            if r.start >= self.proj_end {
                let from = r.start.max(offset);
                b.write(
                    params,
                    from - self.proj_end,
                    &vals[from - offset..end.min(r.end) - offset],
                )?;
                continue;
            }
            if r.start < offset || r.end > end {
                return Err(ModelError::Input(format!(
                    "an NF4 base takes {} whole (a write covered {offset}..{end})",
                    t.name
                )));
            }
            let m = &mut self.mats[i / 7][i % 7];
            let q = crate::quant::quantise(&vals[r.start - offset..r.end - offset]);
            let bytes = |v: &[u8]| v.iter().map(|&c| c as f32).collect::<Vec<_>>();
            b.write(&mut m.codes, 0, &bytes(&q.codes))?;
            b.write(&mut m.scale_codes, 0, &bytes(&q.scale_codes))?;
            b.write(&mut m.absmax, 0, &q.absmax)?;
        }
        Ok(())
    }

    /// Dequantises layer `l`'s matrices of `site` (q, k, v stacked, gate and up stacked, as the
    /// fused weights are laid out) into the scratch and views them.
    pub(crate) fn weight<'s>(&'s mut self, b: &'s B, l: usize, site: Site) -> Result<B::Ref<'s>> {
        let which = match site {
            Site::Qkv => 0..3,
            Site::O => 3..4,
            Site::GateUp => 4..6,
            Site::Down => 6..7,
        };
        let mut at = 0;
        for j in which {
            let m = &self.mats[l][j];
            let (nc, nb, na) = nf4_lens(m.n);
            b.dequant_nf4(DequantNf4 {
                y: b.view_mut(&mut self.scratch, at..at + m.n),
                codes: b.view(&m.codes, 0..nc),
                scale_codes: b.view(&m.scale_codes, 0..nb),
                absmax: b.view(&m.absmax, 0..na),
                n: m.n,
            })?;
            at += self.sizes[j];
        }
        Ok(b.view(&self.scratch, 0..at))
    }
}
