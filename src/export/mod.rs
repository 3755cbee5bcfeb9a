//! Export of a non-linear adapter branch to its best linear map of each rank, and
//! the linearity curve that says how much of the branch such a map reproduces.
//! Nothing here knows Python.
//!
//! - `moments`: streaming float64 moments of `(x, y)` token pairs, mergeable.
//! - `solve`: least squares and reduced-rank regression from those moments, for
//!   every rank at once, and the rank-`k` map as LoRA factors.

pub mod moments;
pub mod solve;

pub use moments::{Moments, MomentsState};
pub use solve::{Fit, Solve};

#[cfg(test)]
mod tests;
