//! Handing every trainable group to a hook without a backward: what a data-parallel rank does
//! when it has no tokens to run (an empty micro-batch in its share of a step) while its peers
//! exchange each group's gradient from their backward's hook ([`Model::backward_with`]).
//! Collectives are meeting points, so this rank must make the same calls in the same order,
//! bringing the gradient it has: the sum since [`Model::zero_grads`], zero if nothing ran.

use nopad_backend::{Backend, BackendError};

use super::{GradState, GroupGrads, Model};
use crate::error::ModelError;

impl<B: Backend> Model<B> {
    /// Calls `hook` for each trainable group ([`Model::trainable_groups`]) in the order
    /// [`Model::backward_with`] does, each with the gradient accumulated since
    /// [`Model::zero_grads`] (zero where nothing ran; always zero in the one-group scratch of
    /// [`Model::set_update_in_backward`], which holds nothing between backwards). The hook may
    /// do what it may do in a backward. Afterwards the gradients count as written, as after a
    /// backward.
    pub fn groups_without_backward<E: From<ModelError> + From<BackendError>>(
        &mut self,
        b: &B,
        mut hook: impl FnMut(GroupGrads<'_, B>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.check_grads()?;
        if let GradState::Pending(_) = self.grad_state {
            return Err(ModelError::Input(
                "a training forward's backward has not run: run it instead".into(),
            )
            .into());
        }
        if self.slots.is_none() {
            // Zero-fills the buffer when nothing was written since zero_grads.
            self.settle_grads(b)?;
        }
        let groups = self.trainable_groups().to_vec();
        for (index, group) in groups.iter().enumerate() {
            let placed = self.slots.as_ref().map(|s| s.groups[index].as_slice());
            for (r, at) in placed.into_iter().flatten() {
                b.zero(b.view_mut(&mut self.grads, *at..at + r.len()))?;
            }
            let params = match &mut self.adapter {
                Some(a) => &mut a.params,
                None => &mut self.params,
            };
            hook(GroupGrads {
                index,
                group,
                params,
                grads: &mut self.grads,
                slots: placed,
            })?;
        }
        self.grad_state = GradState::Written;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use nopad_backend::cpu::Cpu;
    use nopad_backend::Device;

    use crate::config::Config;
    use crate::{Inputs, Model};

    type Seen = Vec<(usize, crate::GroupKind, f64)>;

    /// Notes a handed-over group: its index, kind and squared gradient.
    fn record(
        b: &Cpu<f64>,
        seen: &mut Seen,
        g: crate::GroupGrads<'_, Cpu<f64>>,
    ) -> crate::Result<()> {
        let mut sq = 0.0;
        for (r, _) in g.group.ranges() {
            sq += b
                .read_f64(g.grads, g.grad_range(&r))?
                .iter()
                .map(|v| v * v)
                .sum::<f64>();
        }
        seen.push((g.index, g.group.kind, sq));
        Ok(())
    }

    /// Without a backward, the hook sees the groups the backward hands over, in its order, with
    /// the gradients accumulated so far (zero after zero_grads, in both gradient modes).
    #[test]
    fn hands_over_the_groups_a_backward_would_with_what_they_hold() {
        let b = Cpu::<f64>::new();
        let cfg = Config::preset("tiny").unwrap();
        let tokens = [3, 5, 7, 11, 13];
        let x = Inputs {
            tokens: &tokens,
            targets: &[5, 7, 11, 13, -100],
            position_ids: &[0, 1, 2, 3, 4],
            cu_seqlens: &[0, 5],
            max_seqlen: 5,
        };
        for scratch in [false, true] {
            let mut m = Model::new(&b, cfg.clone()).unwrap();
            let layout = m.layout.clone();
            crate::weights::init_random(&cfg, &layout, 1, |o, v| m.write_params(&b, o, v)).unwrap();
            m.set_update_in_backward(&b, scratch).unwrap();
            let (mut seen, mut again) = (vec![], vec![]);
            m.forward_train(&b, &x, 0.25).unwrap();
            m.backward_with(&b, |g| record(&b, &mut seen, g)).unwrap();
            m.groups_without_backward(&b, |g| record(&b, &mut again, g))
                .unwrap();
            assert_eq!(seen.len(), layout.groups.len());
            for (s, a) in seen.iter().zip(&again) {
                assert_eq!((s.0, s.1), (a.0, a.1));
                assert!(s.2 > 0.0, "{}: a gradient", s.1);
                // The full buffer keeps what the backward wrote; the scratch keeps nothing.
                assert_eq!(
                    a.2,
                    if scratch { 0.0 } else { s.2 },
                    "{} scratch={scratch}",
                    s.1
                );
            }
            m.zero_grads(&b).unwrap();
            m.groups_without_backward(&b, |g| {
                for (r, _) in g.group.ranges() {
                    assert!(b
                        .read_f64(g.grads, g.grad_range(&r))?
                        .iter()
                        .all(|&v| v == 0.0));
                }
                Ok::<(), crate::ModelError>(())
            })
            .unwrap();
        }
    }
}
