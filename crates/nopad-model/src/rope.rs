//! Rotary-embedding inverse frequencies, computed as HF Transformers computes them (in f32),
//! including the `linear`, `llama3`, `yarn` and `dynamic` scaling rules (`dynamic` is plain RoPE
//! within `max_position_embeddings`, the only lengths nopad trains with it).

use crate::config::{Config, RopeScaling};

/// `inv_freq: [Dh/2]` for the model's rotary embeddings.
pub fn inv_freq(c: &Config) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope_theta as f32;
    let plain: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect();
    match &c.rope_scaling {
        RopeScaling::None | RopeScaling::Dynamic { .. } => plain,
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: old,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // HF's `_compute_yarn_parameters`: the correction range in f64, the ramp and the
            // blend in f32.
            let (d, b) = (dim as f64, c.rope_theta);
            let correction = |rotations: f64| {
                d * (old / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * b.ln())
            };
            let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001; // as HF: no division by zero
            }
            let factor = *factor as f32;
            (0..dim / 2)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f32 / dim as f32);
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (factor * pos_freq);
                    let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect()
        }
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

    /// YaRN as HF computes it, on a Qwen2.5-like shape (Dh 128, θ 1e6, factor 4 over 32,768):
    /// the reference values are HF's formula evaluated in f32 with numpy (correction range 23 to
    /// 40): below the range the frequencies are kept, above it divided by the factor, between
    /// them blended.
    #[test]
    fn yarn_blends_as_hf_does() {
        let mut c = Config::preset("qwen2.5-0.5b").unwrap();
        c.head_dim = 128;
        c.rope_theta = 1e6;
        c.rope_scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32768.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        };
        let f = inv_freq(&c);
        let want = [
            (0, 1.0),
            (10, 0.11547820270061493),
            (20, 0.01333521492779255),
            (25, 0.004131738096475601),
            (30, 0.001064361073076725),
            (40, 4.4456985051510856e-05),
            (63, 3.102344408034696e-07),
        ];
        for (i, w) in want {
            // f32 `powf` may differ from numpy's by an ulp or two.
            let rel = (f[i] as f64 - w).abs() / w;
            assert!(rel < 1e-6, "inv_freq[{i}] = {} want {w}", f[i]);
        }
        assert!((c.rope_scaling.attention_factor() - 1.138629436111989).abs() < 1e-15);
        // mscale / mscale_all_dim (DeepSeek's form) and an explicit attention factor.
        let with = |a: Option<f64>, ms: Option<f64>, ma: Option<f64>| RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: a,
            mscale: ms,
            mscale_all_dim: ma,
            truncate: true,
        };
        let m = |k: f64| 0.1 * k * 40f64.ln() + 1.0;
        assert_eq!(
            with(None, Some(0.707), Some(1.0)).attention_factor(),
            m(0.707) / m(1.0)
        );
        assert_eq!(
            with(Some(1.5), Some(0.707), Some(1.0)).attention_factor(),
            1.5
        );
        assert_eq!(RopeScaling::Dynamic { factor: 2.0 }.attention_factor(), 1.0);
        // Dynamic NTK within max_position_embeddings is plain RoPE.
        c.rope_scaling = RopeScaling::Dynamic { factor: 2.0 };
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        assert_eq!(inv_freq(&c), inv_freq(&plain));
    }
}
