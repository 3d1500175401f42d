//! nopad-data's integration tests, one binary (fewer links on two cores): packing properties over
//! random length sets, the loader's epochs and resume, and loading of every input format.

mod cache;
mod conversations;
mod fidelity;
mod formats;
mod inspect;
mod loading;
mod props;
mod ranks;
mod real_tokenizer;
mod tables;
mod untrusted;
mod util;
