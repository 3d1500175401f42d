//! How much of each layer's activations the backward recomputes instead of keeping.

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
}
