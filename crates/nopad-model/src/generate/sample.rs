//! Choosing the next token from a row of logits, as Hugging Face's `generate` does: greedy
//! (temperature 0: the largest logit, the lowest id among equals, as `torch.argmax`), or a draw
//! from `softmax(logits / T)` after top-k and top-p, in HF's order (temperature, top-k, top-p).
//!
//! Top-k keeps every token whose scaled logit is at least the k-th largest (ties at the edge
//! stay, as HF's `TopKLogitsWarper` keeps them); top-p keeps, in order of decreasing
//! probability (the lower id first among equals), each token while the mass before it is below
//! p, so the token that crosses p stays and the most likely always does (HF's
//! `TopPLogitsWarper`). A draw takes one uniform number from the sequence's own [`Rng`] and walks
//! the kept tokens in id order, so a seed gives the same tokens on every run and every backend
//! whose logits agree.

use nopad_rng::Rng;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens up to this much probability (1: all).
    pub top_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::GREEDY
    }
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature {}: must be 0 (greedy) or a positive number",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p {}: must lie in (0, 1]", self.top_p));
        }
        Ok(())
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The tokens a draw may give and their probabilities, `(id, p)` in id order (greedy: the
    /// argmax with probability 1).
    pub fn distribution(&self, logits: &[f64]) -> Vec<(usize, f64)> {
        if self.is_greedy() || logits.is_empty() {
            return logits
                .first()
                .map(|_| (argmax(logits), 1.0))
                .into_iter()
                .collect();
        }
        let scaled: Vec<f64> = logits.iter().map(|&x| x / self.temperature).collect();
        let mut keep: Vec<usize> = (0..scaled.len()).collect();
        if self.top_k > 0 && self.top_k < scaled.len() {
            let mut sorted = scaled.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[self.top_k - 1];
            keep.retain(|&i| scaled[i] >= kth);
        }
        let probs = softmax(&scaled, &keep);
        if self.top_p < 1.0 {
            let mut order: Vec<usize> = (0..keep.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(keep[a].cmp(&keep[b])));
            let mut before = 0.0;
            let mut kept = vec![false; keep.len()];
            for &j in &order {
                if before >= self.top_p {
                    break;
                }
                kept[j] = true;
                before += probs[j];
            }
            let ids: Vec<usize> = (0..keep.len())
                .filter(|&j| kept[j])
                .map(|j| keep[j])
                .collect();
            let probs = softmax(&scaled, &ids);
            return ids.into_iter().zip(probs).collect();
        }
        keep.into_iter().zip(probs).collect()
    }

    /// The next token: the argmax when greedy, else a draw from [`Sampling::distribution`]
    /// with one number from `rng`.
    pub fn pick(&self, logits: &[f64], rng: &mut Rng) -> usize {
        if self.is_greedy() {
            return argmax(logits);
        }
        let dist = self.distribution(logits);
        let u = rng.uniform();
        let mut acc = 0.0;
        for &(id, p) in &dist {
            acc += p;
            if u < acc {
                return id;
            }
        }
        // Rounding left the sum just under u: the last kept token.
        dist.last().map_or(0, |&(id, _)| id)
    }
}

/// The index of the largest value, the lowest among equals (NaN never wins).
pub fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}

/// `softmax` of `x` over the indices `keep` (in their order), from their maximum.
fn softmax(x: &[f64], keep: &[usize]) -> Vec<f64> {
    let m = keep.iter().fold(f64::NEG_INFINITY, |a, &i| a.max(x[i]));
    let e: Vec<f64> = keep.iter().map(|&i| (x[i] - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(d: &[(usize, f64)]) -> Vec<usize> {
        d.iter().map(|&(i, _)| i).collect()
    }

    fn with(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_the_lowest_id_among_equals() {
        assert_eq!(argmax(&[0.0, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f64::NAN, 1.0, 0.5]), 1);
        let mut rng = Rng::new(1);
        assert_eq!(Sampling::GREEDY.pick(&[1.0, 5.0, 5.0], &mut rng), 1);
        assert_eq!(Sampling::GREEDY.distribution(&[2.0, 1.0]), vec![(0, 1.0)]);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties_at_the_edge() {
        let logits = [0.1, 2.0, -3.0, 1.5, 0.7, 1.5];
        assert_eq!(ids(&with(1.0, 2, 1.0).distribution(&logits)), vec![1, 3, 5]);
        assert_eq!(ids(&with(1.0, 1, 1.0).distribution(&logits)), vec![1]);
        assert_eq!(
            ids(&with(1.0, 4, 1.0).distribution(&logits)),
            vec![1, 3, 4, 5]
        );
        assert_eq!(with(1.0, 0, 1.0).distribution(&logits).len(), 6);
        assert_eq!(with(1.0, 9, 1.0).distribution(&logits).len(), 6);
        // Renormalised over what is kept.
        let d = with(1.0, 4, 1.0).distribution(&logits);
        let z: f64 = [2.0f64, 1.5, 0.7, 1.5].iter().map(|x| x.exp()).sum();
        assert!((d[0].1 - 2f64.exp() / z).abs() < 1e-15);
    }

    #[test]
    fn top_p_keeps_tokens_while_the_mass_before_them_is_below_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (as logs, any order of ids).
        let logits = [0.15f64.ln(), 0.5f64.ln(), 0.05f64.ln(), 0.3f64.ln()];
        let keep = |p: f64| ids(&with(1.0, 0, p).distribution(&logits));
        assert_eq!(keep(0.3), vec![1]);
        assert_eq!(keep(0.5), vec![1]);
        assert_eq!(keep(0.51), vec![1, 3]);
        assert_eq!(keep(0.79), vec![1, 3]);
        assert_eq!(keep(0.81), vec![0, 1, 3]);
        assert_eq!(keep(0.96), vec![0, 1, 2, 3]);
        assert_eq!(keep(1.0), vec![0, 1, 2, 3]);
        let d = with(1.0, 0, 0.6).distribution(&logits);
        assert!((d[0].1 - 0.625).abs() < 1e-12 && (d[1].1 - 0.375).abs() < 1e-12);
    }

    #[test]
    fn temperature_then_top_k_then_top_p() {
        // Probabilities .5, .3, .2; at T = 0.5 they become ∝ .25, .09, .04 (.658, .237, .105).
        let logits = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
        let keep = |t, k, p| ids(&with(t, k, p).distribution(&logits));
        // Temperature before top-p: at T = 1 the mass before id 1 is .5 < .65, at T = .5 it is
        // .658.
        assert_eq!(keep(1.0, 0, 0.65), vec![0, 1]);
        assert_eq!(keep(0.5, 0, 0.65), vec![0]);
        // Top-k before top-p, which sees the kept tokens renormalised (.625, .375): the mass
        // before id 1 is then .625 > .6, where over all three it would be .5.
        assert_eq!(keep(1.0, 0, 0.6), vec![0, 1]);
        assert_eq!(keep(1.0, 2, 0.6), vec![0]);
        assert_eq!(keep(0.5, 2, 0.7), vec![0]);
        assert_eq!(keep(2.0, 0, 0.75), vec![0, 1, 2]);
    }

    #[test]
    fn a_seed_gives_the_same_draws_and_draws_follow_the_distribution() {
        let logits: Vec<f64> = (0..10).map(|i| (i as f64 * 0.7).sin()).collect();
        let s = with(0.8, 6, 0.9);
        let draw = |seed: u64| -> Vec<usize> {
            let mut rng = Rng::new(seed);
            (0..4000).map(|_| s.pick(&logits, &mut rng)).collect()
        };
        let (a, b, c) = (draw(5), draw(5), draw(6));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let dist = s.distribution(&logits);
        for &(id, p) in &dist {
            let f = a.iter().filter(|&&t| t == id).count() as f64 / a.len() as f64;
            // Four standard deviations of a frequency over 4000 draws.
            assert!(
                (f - p).abs() < 4.0 * (p * (1.0 - p) / 4000.0).sqrt() + 1e-3,
                "{id}: {f} vs {p}"
            );
        }
        assert!(a.iter().all(|t| dist.iter().any(|&(id, _)| id == *t)));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        assert!(with(-1.0, 0, 1.0)
            .validate()
            .unwrap_err()
            .contains("--temperature"));
        assert!(with(f64::NAN, 0, 1.0).validate().is_err());
        assert!(with(1.0, 0, 0.0)
            .validate()
            .unwrap_err()
            .contains("--top-p"));
        assert!(with(1.0, 0, 1.5).validate().is_err());
        assert!(with(0.7, 40, 0.95).validate().is_ok());
    }
}
