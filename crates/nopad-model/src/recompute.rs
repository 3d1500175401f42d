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
    /// that GEMM in the backward (about 8% more compute on Llama shapes).
    Mlp,
    /// Keep only each layer's input residual stream and rerun the layer's forward in the
    /// backward: activation memory of one layer instead of all, about a third more compute.
    Full,
}

impl FromStr for Recompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "false" => Ok(Recompute::None),
            "mlp" => Ok(Recompute::Mlp),
            "full" | "true" => Ok(Recompute::Full),
            _ => Err(format!("`{s}` is not one of none, mlp, full")),
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Recompute::None => "none",
            Recompute::Mlp => "mlp",
            Recompute::Full => "full",
        })
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
