//! QLoRA on the CPU: a LoRA model over an NF4 base equals, bit for bit (f32 and f64), a LoRA
//! model whose base projections were replaced by their dequantised values (loss and adapter
//! gradients, with dropout and recomputation); its parameter buffer holds only what is not
//! quantised; a projection written in pieces is refused. (Adapter gradients against finite
//! differences through an NF4 base: `tests.rs`.)

use nopad_backend::cpu::{Cpu, Scalar};
use nopad_rng::Rng;

use super::tests::{lora_cfg, lora_model, lora_model_over};
use super::Target;
use crate::quant::{as_base, quantise, BaseDtype};
use crate::tests::{examples, flatten, loss_and_grads, same_bits, tiny, tiny_qwen3};
use crate::{Config, Model, Recompute};

/// Replaces every projection matrix of `m`'s base by its NF4 round trip.
fn dequantised_base<T: Scalar>(b: &Cpu<T>, m: &mut Model<Cpu<T>>) {
    use nopad_backend::Device;
    let layout = m.layout.clone();
    for t in layout
        .tensors
        .iter()
        .filter(|t| t.offset < layout.embed.start)
    {
        let vals = b.read(&m.params, t.range()).unwrap();
        let back = as_base(BaseDtype::Nf4, &layout, t.offset, &vals);
        assert_eq!(*back, quantise(&vals).dequantise());
        m.write_params(b, t.offset, &back).unwrap();
    }
}

fn same_as_dequantised_lora<T: Scalar>(cfg: Config, recompute: Recompute) {
    let b = Cpu::<T>::new();
    let (tied, bias) = (cfg.tie_word_embeddings, cfg.qkv_bias);
    let lc = lora_cfg(4, 0.2, &Target::ALL);
    let mut q = lora_model_over(&b, cfg.clone(), lc.clone(), 9, true, BaseDtype::Nf4);
    let mut l = lora_model(&b, cfg.clone(), lc, 9, true);
    dequantised_base(&b, &mut l);
    assert_eq!(q.base_dtype(), BaseDtype::Nf4);
    // Only the embedding, head, norms and biases stay in the parameter buffer.
    assert_eq!(q.params.len(), q.layout.total - q.layout.embed.start);
    let exs = examples(&mut Rng::new(4), &[7, 3, 11], cfg.vocab_size);
    let p = flatten(&exs);
    for m in [&mut q, &mut l] {
        m.set_recompute(recompute);
        m.set_lora_step(2);
    }
    let (lq, gq) = loss_and_grads(&b, &mut q, &[&p], 0.5);
    let (ll, gl) = loss_and_grads(&b, &mut l, &[&p], 0.5);
    let what = format!("{:?} tied {tied} bias {bias} {recompute}", cfg.arch);
    assert_eq!(lq.to_bits(), ll.to_bits(), "{what}: loss {lq} vs {ll}");
    assert!(same_bits(&gq, &gl), "{what}: adapter gradients differ");
    assert!(gq.iter().any(|&g| g != 0.0));
    // Evaluation too (no dropout).
    let eval = |m: &mut Model<Cpu<T>>| {
        m.forward_eval(&b, &p.inputs()).unwrap();
        m.take_loss_sum(&b).unwrap()
    };
    assert_eq!(
        eval(&mut q).to_bits(),
        eval(&mut l).to_bits(),
        "{what}: eval"
    );
}

#[test]
fn qlora_equals_lora_over_the_dequantised_base_bit_for_bit() {
    same_as_dequantised_lora::<f32>(tiny(false, true), Recompute::None);
    same_as_dequantised_lora::<f32>(tiny(true, false), Recompute::Full);
    same_as_dequantised_lora::<f64>(tiny(false, false), Recompute::Mlp(None));
    // Qwen3: the q/k norms' weights are read from the shifted parameter buffer.
    same_as_dequantised_lora::<f32>(tiny_qwen3(false, true), Recompute::Full);
}

#[test]
fn an_nf4_base_takes_its_projections_whole() {
    let b = Cpu::<f32>::new();
    let cfg = tiny(false, false);
    let lc = lora_cfg(2, 0.0, &[Target::Q]);
    let mut m = Model::new_lora_over(&b, cfg, lc, BaseDtype::Nf4, true).unwrap();
    let e = m.write_params(&b, 3, &[1.0; 4]).unwrap_err().to_string();
    assert!(e.contains("q_proj") && e.contains("whole"), "{e}");
    // A write of everything at once is split by tensor.
    let all = vec![0.5f32; m.layout.total];
    m.write_params(&b, 0, &all).unwrap();
    assert!(m.params.iter().all(|&x| x == 0.5));
}
