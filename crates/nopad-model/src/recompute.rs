//! How much of each layer's activations the backward recomputes instead of keeping, and where
//! each layer keeps its gate/up projections ([`gu_homes`]).

use std::fmt;
use std::str::FromStr;

/// Activation recomputation. Results are the same in every mode (bit-identical on the CPU); only
/// memory and time change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every layer's saved activations (the norm and SwiGLU outputs are always recomputed:
    /// they are cheap).
    #[default]
    None,
    /// Also drop the gate/up projections `[N, 2F]`, two thirds of what a layer keeps, and redo
    /// that GEMM in the backward (about 8% more compute on Llama shapes), in every layer
    /// (`None`, written `mlp`) or in the first K layers (`Some(K)`, written `mlp:K`), for a
    /// memory/time trade in between. One shared `[N, 2F]` buffer holds the recomputed
    /// projections, so K layers save K - 1 layers' worth.
    Mlp(Option<usize>),
    /// Keep only each layer's input residual stream and rerun the layer's forward in the
    /// backward: activation memory of one layer instead of all, about a third more compute.
    Full,
}

impl FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "false" => Ok(Recompute::None),
            "mlp" => Ok(Recompute::Mlp(None)),
            "full" | "true" => Ok(Recompute::Full),
            _ => match s.strip_prefix("mlp:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(Recompute::Mlp(Some(k))),
                _ => Err(format!(
                    "`{s}` is not one of none, mlp, mlp:K (K layers, a number), full"
                )),
            },
        }
    }
}

impl Recompute {
    /// Whether layer `l` recomputes its gate/up projections in the backward.
    pub fn mlp_in_layer(&self, l: usize) -> bool {
        match *self {
            Recompute::Mlp(None) => true,
            Recompute::Mlp(Some(k)) => l < k,
            _ => false,
        }
    }
}

/// Where a layer keeps its gate/up projections `[N, 2F]` (two thirds of what it saves) between
/// its forward and its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuHome {
    /// In the layer's saved activations.
    Kept,
    /// Nowhere: the backward recomputes them into one shared buffer (`Recompute::Mlp`).
    Recomputed,
    /// In page-locked host memory (`--offload activations:K`): the forward writes them into one
    /// of two device buffers the offloaded layers take turns in, and they travel to the host
    /// while the next layers compute; the backward brings them back while the layer above runs.
    Offloaded,
}

/// Each layer's [`GuHome`] with `offload` of `n_layers` layers offloaded and recomputation
/// `mode`. The offloaded layers are spread evenly over the stack (layer `⌊(2i + 1)·L / 2K⌋` for
/// `i < K`: every other layer at K = L/2), so each copy has the layers in between to travel
/// in; then `Recompute::Mlp(Some(k))` recomputes the first `k` of the others (`Mlp(None)`: all
/// of them). `offload` larger than the stack, or with `Recompute::Full` (which keeps no `gu`
/// to offload), is refused.
pub fn gu_homes(n_layers: usize, mode: Recompute, offload: usize) -> Result<Vec<GuHome>, String> {
    if offload > n_layers {
        return Err(format!(
            "`--offload activations:{offload}`: the model has only {n_layers} layers"
        ));
    }
    if offload > 0 && mode == Recompute::Full {
        return Err(
            "`--offload activations` with `--recompute full`: full recomputation keeps no \
             per-layer activations to offload; use `--recompute none` or `mlp:K` with it"
                .into(),
        );
    }
    let mut homes = vec![GuHome::Kept; n_layers];
    for i in 0..offload {
        homes[(2 * i + 1) * n_layers / (2 * offload)] = GuHome::Offloaded;
    }
    let mut left = match mode {
        Recompute::Mlp(None) => n_layers,
        Recompute::Mlp(Some(k)) => k,
        Recompute::None | Recompute::Full => 0,
    };
    for h in homes.iter_mut().filter(|h| **h == GuHome::Kept) {
        if left == 0 {
            break;
        }
        *h = GuHome::Recomputed;
        left -= 1;
    }
    Ok(homes)
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recompute::None => f.write_str("none"),
            Recompute::Mlp(None) => f.write_str("mlp"),
            Recompute::Mlp(Some(k)) => write!(f, "mlp:{k}"),
            Recompute::Full => f.write_str("full"),
        }
    }
}

/// Config files may say `recompute = "mlp"`, or `true`/`false` (full/none) as before.
impl<'de> serde::Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bool(true) => Ok(Recompute::Full),
            Repr::Bool(false) => Ok(Recompute::None),
            Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl serde::Serialize for Recompute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::Recompute;

    #[test]
    fn modes_parse_and_print() {
        for (s, m) in [
            ("none", Recompute::None),
            ("mlp", Recompute::Mlp(None)),
            ("mlp:3", Recompute::Mlp(Some(3))),
            ("full", Recompute::Full),
        ] {
            assert_eq!(s.parse::<Recompute>().unwrap(), m);
            assert_eq!(m.to_string(), s);
        }
        assert!("mlp:x".parse::<Recompute>().unwrap_err().contains("mlp:K"));
        assert!("some".parse::<Recompute>().is_err());
        assert!(Recompute::Mlp(Some(2)).mlp_in_layer(1));
        assert!(!Recompute::Mlp(Some(2)).mlp_in_layer(2));
        assert!(!Recompute::Full.mlp_in_layer(0));
    }

    #[test]
    fn offloaded_layers_spread_and_recomputation_takes_the_first_others() {
        use super::{gu_homes, GuHome::*};
        let h = gu_homes(8, Recompute::Mlp(Some(2)), 4).unwrap();
        assert_eq!(
            h,
            [Recomputed, Offloaded, Recomputed, Offloaded, Kept, Offloaded, Kept, Offloaded]
        );
        let h = gu_homes(5, Recompute::None, 1).unwrap();
        assert_eq!(h, [Kept, Kept, Offloaded, Kept, Kept]);
        assert_eq!(
            gu_homes(3, Recompute::Mlp(None), 3).unwrap(),
            [Offloaded; 3]
        );
        assert_eq!(
            gu_homes(3, Recompute::Mlp(None), 0).unwrap(),
            [Recomputed; 3]
        );
        // Every count spreads to distinct layers.
        for n in 1..40 {
            for k in 0..=n {
                let h = gu_homes(n, Recompute::None, k).unwrap();
                assert_eq!(h.iter().filter(|&&x| x == Offloaded).count(), k, "{n} {k}");
            }
        }
        assert!(gu_homes(3, Recompute::None, 4)
            .unwrap_err()
            .contains("only 3 layers"));
        assert!(gu_homes(3, Recompute::Full, 1).is_err());
    }
}
