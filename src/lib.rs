//! cera_rs: CeRA (Capacity-enhanced Rank Adaptation) kernels over libtorch tensors.
//!
//! `kernel` holds the branch's forward and backward; nothing in it knows Python.
//! With the `python` feature (turned on by maturin only), `python` exposes it as
//! the `cera_rs._native` extension module.

pub mod error;
pub mod export;
pub mod kernel;
pub mod spectral;
mod threads;

#[cfg(test)]
mod test_rng;

#[cfg(feature = "python")]
mod python;

pub use error::{CeraError, Result};
