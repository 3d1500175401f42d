//! PEFT's initialisation of a fresh adapter: A Kaiming-uniform with `a = √5`, which is
//! `U(−1/√in, 1/√in)`, and B zero, so a new adapter leaves the base model's output unchanged.
//! Each A draws from its own stream derived from the seed and its name, so the values do not
//! depend on which other modules are targeted.

use nopad_rng::Rng;

use super::layout::peft_name;
use super::AdapterLayout;
use crate::error::Result;

/// Writes a fresh adapter of `layout` through `sink(offset, values)`.
pub fn init_adapter(
    layout: &AdapterLayout,
    seed: u64,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let mods = layout.layers.iter().enumerate();
    for (l, m) in mods.flat_map(|(l, ms)| ms.iter().map(move |m| (l, m))) {
        let a_name = peft_name(l, m.target, "A");
        let bound = 1.0 / (m.d_in as f64).sqrt();
        let mut rng = Rng::derived(seed, &format!("lora init {a_name}"));
        let a: Vec<f32> =
            m.a.clone()
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
        sink(m.a.start, &a)?;
        sink(m.b.start, &vec![0.0; m.b.len()])?;
    }
    Ok(())
}
