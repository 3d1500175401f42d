//! One module per subcommand: its flags (clap `Args`) and its `run`, which builds the library's
//! configuration and hands it to `crate::device::run_on`.

pub mod bench;
pub mod eval;
pub mod stats;
pub mod train;
