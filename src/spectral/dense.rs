//! Singular values of one matrix.
//!
//! libtorch's `linalg_svdvals` takes a solver name that tch always passes and that
//! CPU builds refuse, so this goes the way LAPACK's own tall-matrix path does: QR
//! first (only `R` is formed), then values-only SVD of the small square factor.

use super::input::matrix_f64;
use super::metrics::Spectrum;
use crate::error::Result;
use tch::{Device, Tensor};

/// The singular values of a 2-D matrix (any real dtype, finite), in float64.
pub fn spectrum(matrix: &Tensor) -> Result<Spectrum> {
    let _no_grad = tch::no_grad_guard();
    let m = matrix_f64(matrix, "matrix")?;
    Spectrum::new(singular_values(&m)?)
}

/// Singular values of a checked float64 matrix, `min(rows, cols)` of them.
pub(super) fn singular_values(m: &Tensor) -> Result<Vec<f64>> {
    let (rows, cols) = m.size2()?;
    if rows.min(cols) == 0 {
        return Ok(Vec::new());
    }
    let tall = if rows >= cols {
        m.shallow_clone()
    } else {
        m.f_tr()?
    };
    let square = if rows != cols {
        Tensor::f_linalg_qr(&tall, "r")?.1
    } else {
        tall
    };
    // Values only: U and V come back zero-filled and `min(rows, cols)` square.
    let (_, s, _) = square.f_svd(true, false)?;
    Ok(Vec::<f64>::try_from(&s.f_to_device(Device::Cpu)?)?)
}
