//! One error type for the crate. The PyO3 layer maps each variant to a Python
//! exception exactly once (see `lib.rs`); kernels never panic on bad input.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CeraError {
    /// Shapes that do not fit together (wrong last dimension, rank mismatch, ...).
    #[error("shape error: {0}")]
    Shape(String),
    /// A dtype the kernel does not support, or dtypes that differ between inputs.
    #[error("dtype error: {0}")]
    DType(String),
    /// Inputs on different devices.
    #[error("device error: {0}")]
    Device(String),
    /// A scalar argument out of its domain (dropout probability, activation name, ...).
    #[error("invalid value: {0}")]
    Value(String),
    /// NaN or infinity where a finite matrix is needed (spectra, Gram matrices).
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// A resource the kernel could not get (threads, memory).
    #[error("runtime error: {0}")]
    Runtime(String),
    /// An error reported by libtorch itself.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, CeraError>;
