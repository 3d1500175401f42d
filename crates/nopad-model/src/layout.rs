//! Where every parameter lives in the one flat parameter buffer (and, at the same offsets, in the
//! gradient and optimizer buffers), under its Hugging Face name.
//!
//! Three deliberate choices:
//! - q, k and v projections of a layer are adjacent rows of one `[(H + 2·Hkv)·Dh, D]` matrix, and
//!   gate and up of one `[2F, D]` matrix, so each is one GEMM. Their HF tensors are row ranges of it.
//! - All weight matrices come first and all norms and biases after them, so AdamW's two groups
//!   (with and without weight decay, as HF Trainer splits them) are two contiguous ranges.
//! - The layers' matrices come first, in layer order, then the embedding and output head: the
//!   model places the gradient buffer over activations (`Model::set_grad_aliasing`): layer `l`'s
//!   gradients may cover only activations of the layers above `l` (dead by the time the backward
//!   reaches `l`), so the lowest layer's come first; the head's gradient, written in the
//!   forward, and the norms' lie above every activation.
//!
//! The same buffer is also cut into [`ParamGroup`]s, the unit an optimizer updates, freezes,
//! keeps in another precision or places on another rank: one per decoder layer, the embedding,
//! the output head (when untied) and the final norm. A group is a set of ranges, split into
//! those that take weight decay and those that do not; the groups tile the buffer.

use std::ops::Range;

use crate::config::Config;

/// One HF tensor: its name, shape, and where it lives in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// HF shape.
    pub shape: Vec<usize>,
    /// Offset of the first element.
    pub offset: usize,
}

impl TensorSpec {
    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Ranges of one decoder layer's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRanges {
    /// `[(H + 2·Hkv)·Dh, D]`: q_proj, k_proj, v_proj rows.
    pub qkv_w: Range<usize>,
    /// `[(H + 2·Hkv)·Dh]` when the model has q/k/v biases.
    pub qkv_b: Option<Range<usize>>,
    /// `[D, H·Dh]`.
    pub o_w: Range<usize>,
    /// `[D]` when the model has an output-projection bias.
    pub o_b: Option<Range<usize>>,
    /// `[2F, D]`: gate_proj rows then up_proj rows.
    pub gate_up_w: Range<usize>,
    /// `[D, F]`.
    pub down_w: Range<usize>,
    /// `[D]` input_layernorm.
    pub ln1: Range<usize>,
    /// `[D]` post_attention_layernorm.
    pub ln2: Range<usize>,
    /// `[2·Dh]` when the model normalises its query and key heads: q_norm's weight, then
    /// k_norm's.
    pub qk_norm: Option<Range<usize>>,
}

impl LayerRanges {
    /// The same layer with every range mapped by `f` (where another buffer holds the layer).
    pub fn map(&self, f: impl Fn(&Range<usize>) -> Range<usize>) -> LayerRanges {
        LayerRanges {
            qkv_w: f(&self.qkv_w),
            qkv_b: self.qkv_b.as_ref().map(&f),
            o_w: f(&self.o_w),
            o_b: self.o_b.as_ref().map(&f),
            gate_up_w: f(&self.gate_up_w),
            down_w: f(&self.down_w),
            ln1: f(&self.ln1),
            ln2: f(&self.ln2),
            qk_norm: self.qk_norm.as_ref().map(&f),
        }
    }

    /// The norms' and biases' ranges (no weight decay), in layout order.
    pub fn vectors(&self) -> impl Iterator<Item = &Range<usize>> {
        let norms = [&self.ln1, &self.ln2].into_iter();
        norms.chain(
            [&self.qk_norm, &self.qkv_b, &self.o_b]
                .into_iter()
                .flatten(),
        )
    }
}

/// The whole parameter layout.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `[V, D]` embedding (also the output head when tied).
    pub embed: Range<usize>,
    /// Per layer.
    pub layers: Vec<LayerRanges>,
    /// `[V, D]` output head (equal to `embed` when tied).
    pub lm_head: Range<usize>,
    /// `[D]` final norm.
    pub norm: Range<usize>,
    /// Parameters that take weight decay (all matrices): `0..decay_end`.
    pub decay_end: usize,
    /// Total parameters.
    pub total: usize,
    /// Every HF tensor, in checkpoint order.
    pub tensors: Vec<TensorSpec>,
    /// The parameter groups, in the order the backward completes their gradients.
    pub groups: Vec<ParamGroup>,
}

/// Which part of the model a [`ParamGroup`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// The untied output head (its gradient is written by the training forward).
    Head,
    /// The final norm.
    FinalNorm,
    /// Decoder layer `l`: its matrices, norms and biases.
    Layer(usize),
    /// The token embedding (and the output head when tied).
    Embedding,
}

impl std::fmt::Display for GroupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupKind::Head => write!(f, "lm_head"),
            GroupKind::FinalNorm => write!(f, "norm"),
            GroupKind::Layer(l) => write!(f, "layer.{l}"),
            GroupKind::Embedding => write!(f, "embed"),
        }
    }
}

/// A set of parameters updated together, as ranges of the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamGroup {
    /// What it holds.
    pub kind: GroupKind,
    /// Ranges that take weight decay (matrices), ascending, non-adjacent.
    pub decay: Vec<Range<usize>>,
    /// Ranges that take none (norms and biases, as HF Trainer splits them), ascending,
    /// non-adjacent.
    pub no_decay: Vec<Range<usize>>,
}

impl ParamGroup {
    /// Elements in the group.
    pub fn len(&self) -> usize {
        self.ranges().map(|(r, _)| r.len()).sum()
    }

    /// Whether the group holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every range with whether it takes weight decay, decayed ranges first.
    pub fn ranges(&self) -> impl Iterator<Item = (Range<usize>, bool)> + '_ {
        let d = self.decay.iter().map(|r| (r.clone(), true));
        d.chain(self.no_decay.iter().map(|r| (r.clone(), false)))
    }
}

/// Appends `r` to ascending ranges, merging it with the last one where they touch.
fn push_range(v: &mut Vec<Range<usize>>, r: Range<usize>) {
    if r.is_empty() {
        return;
    }
    match v.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => v.push(r),
    }
}

struct Alloc {
    next: usize,
    tensors: Vec<TensorSpec>,
}

impl Alloc {
    fn take(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let spec = TensorSpec {
            name,
            shape,
            offset: self.next,
        };
        let r = spec.range();
        self.next = r.end;
        self.tensors.push(spec);
        r
    }
    /// A matrix made of several HF tensors stacked by rows.
    fn stacked(&mut self, parts: &[(String, usize)], cols: usize) -> Range<usize> {
        let start = self.next;
        for (name, rows) in parts {
            self.take(name.clone(), vec![*rows, cols]);
        }
        start..self.next
    }
    fn stacked_vec(&mut self, parts: &[(String, usize)]) -> Range<usize> {
        let start = self.next;
        for (name, len) in parts {
            self.take(name.clone(), vec![*len]);
        }
        start..self.next
    }
}

impl Layout {
    /// The layout of a configuration.
    pub fn new(c: &Config) -> Layout {
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut a = Alloc {
            next: 0,
            tensors: Vec::new(),
        };
        let p = |i: usize, s: &str| format!("model.layers.{i}.{s}");
        let mut mats = Vec::new();
        for i in 0..c.num_hidden_layers {
            let qkv_w = a.stacked(
                &[
                    (p(i, "self_attn.q_proj.weight"), qd),
                    (p(i, "self_attn.k_proj.weight"), kvd),
                    (p(i, "self_attn.v_proj.weight"), kvd),
                ],
                d,
            );
            let o_w = a.take(p(i, "self_attn.o_proj.weight"), vec![d, qd]);
            let gate_up_w = a.stacked(
                &[
                    (p(i, "mlp.gate_proj.weight"), f),
                    (p(i, "mlp.up_proj.weight"), f),
                ],
                d,
            );
            let down_w = a.take(p(i, "mlp.down_proj.weight"), vec![d, f]);
            mats.push((qkv_w, o_w, gate_up_w, down_w));
        }
        let embed = a.take("model.embed_tokens.weight".into(), vec![v, d]);
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            a.take("lm_head.weight".into(), vec![v, d])
        };
        let decay_end = a.next;
        let mut layers = Vec::new();
        for (i, (qkv_w, o_w, gate_up_w, down_w)) in mats.into_iter().enumerate() {
            let ln1 = a.take(p(i, "input_layernorm.weight"), vec![d]);
            let ln2 = a.take(p(i, "post_attention_layernorm.weight"), vec![d]);
            let qk_norm = c.qk_norm.then(|| {
                a.stacked_vec(&[
                    (p(i, "self_attn.q_norm.weight"), c.head_dim),
                    (p(i, "self_attn.k_norm.weight"), c.head_dim),
                ])
            });
            let qkv_b = c.qkv_bias.then(|| {
                a.stacked_vec(&[
                    (p(i, "self_attn.q_proj.bias"), qd),
                    (p(i, "self_attn.k_proj.bias"), kvd),
                    (p(i, "self_attn.v_proj.bias"), kvd),
                ])
            });
            let o_b = c
                .o_bias
                .then(|| a.take(p(i, "self_attn.o_proj.bias"), vec![d]));
            layers.push(LayerRanges {
                qkv_w,
                qkv_b,
                o_w,
                o_b,
                gate_up_w,
                down_w,
                ln1,
                ln2,
                qk_norm,
            });
        }
        let norm = a.take("model.norm.weight".into(), vec![d]);
        let groups = groups(&layers, &embed, &lm_head, &norm);
        Layout {
            embed,
            layers,
            lm_head,
            norm,
            decay_end,
            total: a.next,
            tensors: a.tensors,
            groups,
        }
    }

    /// The group of a kind, if the model has one (a tied model has no `Head`).
    pub fn group(&self, kind: GroupKind) -> Option<&ParamGroup> {
        self.groups.iter().find(|g| g.kind == kind)
    }

    /// Ranges of the norm weights (initialised to 1; everything else is random or zero).
    pub fn norm_ranges(&self) -> Vec<Range<usize>> {
        let mut v: Vec<_> = self
            .layers
            .iter()
            .flat_map(|l| [Some(l.ln1.clone()), Some(l.ln2.clone()), l.qk_norm.clone()])
            .flatten()
            .collect();
        v.push(self.norm.clone());
        v
    }

    /// Ranges of the biases (initialised to 0).
    pub fn bias_ranges(&self) -> Vec<Range<usize>> {
        self.layers
            .iter()
            .flat_map(|l| [l.qkv_b.clone(), l.o_b.clone()])
            .flatten()
            .collect()
    }
}

/// The groups in the order the backward completes them: the untied head (written by the
/// training forward), the final norm, the layers from the top down, the embedding (which, tied,
/// is also the head).
fn groups(
    layers: &[LayerRanges],
    embed: &Range<usize>,
    lm_head: &Range<usize>,
    norm: &Range<usize>,
) -> Vec<ParamGroup> {
    let single = |kind, r: &Range<usize>, decay: bool| {
        let (mut d, mut nd) = (vec![], vec![]);
        push_range(if decay { &mut d } else { &mut nd }, r.clone());
        ParamGroup {
            kind,
            decay: d,
            no_decay: nd,
        }
    };
    let mut v = Vec::with_capacity(layers.len() + 3);
    if lm_head != embed {
        v.push(single(GroupKind::Head, lm_head, true));
    }
    v.push(single(GroupKind::FinalNorm, norm, false));
    for (l, lr) in layers.iter().enumerate().rev() {
        let mut g = ParamGroup {
            kind: GroupKind::Layer(l),
            decay: vec![],
            no_decay: vec![],
        };
        for r in [&lr.qkv_w, &lr.o_w, &lr.gate_up_w, &lr.down_w] {
            push_range(&mut g.decay, r.clone());
        }
        for r in lr.vectors() {
            push_range(&mut g.no_decay, r.clone());
        }
        v.push(g);
    }
    v.push(single(GroupKind::Embedding, embed, true));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_tile_the_buffer_and_groups_are_contiguous() {
        for name in ["tiny", "qwen2.5-0.5b", "llama-2-7b", "qwen3-0.6b"] {
            let c = Config::preset(name).unwrap();
            let l = Layout::new(&c);
            let mut next = 0;
            for t in &l.tensors {
                assert_eq!(t.offset, next, "{}", t.name);
                next += t.len();
            }
            assert_eq!(next, l.total);
            // Everything after decay_end is a norm or a bias.
            for t in &l.tensors {
                let is_vec = t.shape.len() == 1;
                assert_eq!(t.offset >= l.decay_end, is_vec, "{}", t.name);
            }
            assert_eq!(
                l.tensors.iter().any(|t| t.name == "lm_head.weight"),
                !c.tie_word_embeddings
            );
        }
    }

    #[test]
    fn groups_tile_the_buffer_with_the_decay_split() {
        for name in ["tiny", "qwen2.5-0.5b", "llama-2-7b", "qwen3-0.6b"] {
            let c = Config::preset(name).unwrap();
            let l = Layout::new(&c);
            let mut all: Vec<(Range<usize>, bool)> =
                l.groups.iter().flat_map(|g| g.ranges()).collect();
            all.sort_by_key(|(r, _)| r.start);
            let mut next = 0;
            for (r, decay) in &all {
                assert_eq!(r.start, next, "{name}: groups leave a gap or overlap");
                assert_eq!(*decay, r.end <= l.decay_end, "{name}: {r:?}");
                next = r.end;
            }
            assert_eq!(next, l.total, "{name}");
            let sum: usize = l.groups.iter().map(|g| g.len()).sum();
            assert_eq!(sum, l.total, "{name}");
            // Backward order: the layers from the top down, the embedding last.
            let kinds: Vec<GroupKind> = l.groups.iter().map(|g| g.kind).collect();
            let n = c.num_hidden_layers;
            assert_eq!(kinds.last(), Some(&GroupKind::Embedding));
            assert_eq!(kinds.contains(&GroupKind::Head), !c.tie_word_embeddings);
            let layers: Vec<usize> = kinds
                .iter()
                .filter_map(|k| match k {
                    GroupKind::Layer(i) => Some(*i),
                    _ => None,
                })
                .collect();
            assert_eq!(layers, (0..n).rev().collect::<Vec<_>>(), "{name}");
            // A layer's group is exactly its tensors.
            let g = l.group(GroupKind::Layer(0)).unwrap();
            let of_layer: usize = l
                .tensors
                .iter()
                .filter(|t| t.name.starts_with("model.layers.0."))
                .map(|t| t.len())
                .sum();
            assert_eq!(g.len(), of_layer, "{name}");
        }
    }
}
