//! Rotary-embedding inverse frequencies, computed as HF Transformers computes them (in f32),
//! including the `linear` and `llama3` scaling rules.

use crate::config::{Config, RopeScaling};

/// `inv_freq: [Dh/2]` for the model's rotary embeddings.
pub fn inv_freq(c: &Config) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope_theta as f32;
    let plain: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    match &c.rope_scaling {
        RopeScaling::None => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        } => {
            // HF computes these in f32.
            let [factor, low, high, old] = [factor, low, high, old].map(|&v| v as f32);
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f // high frequencies are kept
                    } else if wavelen > low_wavelen {
                        f / factor // low frequencies are scaled
                    } else {
                        // in between: interpolate smoothly
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_scales_low_and_blends_between() {
        let c = Config::preset("llama-3.2-1b").unwrap();
        let f = inv_freq(&c);
        assert_eq!(f.len(), 32);
        let mut plain_cfg = c.clone();
        plain_cfg.rope_scaling = RopeScaling::None;
        let p = inv_freq(&plain_cfg);
        assert_eq!(f[0], p[0]); // wavelength 2π < 2048: unchanged
        assert!((f[31] - p[31] / 32.0).abs() <= 1e-12 * p[31].abs().max(1.0)); // longest: / factor
                                                                               // Every value lies between the scaled and the unscaled frequency.
        for (a, b) in f.iter().zip(&p) {
            assert!(*a <= *b && *a >= b / 32.0 * 0.999_999);
        }
        assert!(
            f.iter().zip(&p).any(|(a, b)| *a < *b && *a > b / 32.0),
            "some band is blended"
        );
    }
}
