//! Spectra of adapter updates and of adapter outputs collected over tokens, and the
//! rank-collapse metrics over them (definitions: `docs/cera-method.md`, "Spectral
//! metrics"). Nothing here knows Python.
//!
//! - `dense`: singular values of one matrix.
//! - `gram`: a streaming float64 Gram accumulator, whose memory does not grow with
//!   the number of tokens and which merges across processes by summation.
//! - `lowrank`: the exact spectrum of `B·A` from its factors, with no `d x d` SVD.
//! - `metrics`: `Spectrum`, the singular values and every metric over them.

pub mod dense;
pub mod gram;
pub(crate) mod input;
pub mod lowrank;
pub mod metrics;

pub use gram::Gram;
pub use metrics::Spectrum;

use crate::error::Result;
use rayon::prelude::*;

/// Maps `f` over `items` on the crate's rayon pool (sized like libtorch's intra-op
/// pool): many modules' spectra at once, results in input order, first error wins.
pub fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    f: impl Fn(T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    crate::threads::install(|| items.into_par_iter().map(f).collect::<Result<Vec<R>>>())?
}

#[cfg(test)]
mod tests;
