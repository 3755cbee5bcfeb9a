//! The CeRA branch: forward, backward, the fused elementwise passes and the
//! counter-based dropout mask. Nothing here knows about Python.

pub mod activation;
pub mod branch;
pub mod elementwise;
pub mod mask;

pub use activation::Activation;
pub use branch::{backward, forward, DropoutPosition, Grads, Needs, Saved};
pub use elementwise::Elementwise;
pub use mask::Dropout;

#[cfg(test)]
mod tests;
