//! The exact spectrum of a low-rank update `B·A` (LoRA's `B A`, CeRA's linear part)
//! from its factors. With `B = Q_B R_B` and `A^T = Q_A R_A`,
//! `B A = Q_B (R_B R_A^T) Q_A^T`, and `Q_B`, `Q_A` have orthonormal columns, so the
//! singular values of `B A` are those of the `r x r` core `R_B R_A^T`: cost
//! `O((d_out + d_in) r^2)`, never a `d x d` decomposition.

use super::dense::singular_values;
use super::input::matrix_f64;
use super::metrics::Spectrum;
use crate::error::{CeraError, Result};
use tch::Tensor;

/// Singular values of `B·A` for `B` of shape `(d_out, r)` and `A` of shape
/// `(r, d_in)`: the `min(d_out, d_in)` values of the dense product, at most `r` of
/// them non-zero.
pub fn spectrum(b: &Tensor, a: &Tensor) -> Result<Spectrum> {
    let _no_grad = tch::no_grad_guard();
    let b = matrix_f64(b, "B")?;
    let a = matrix_f64(a, "A")?;
    let (d_out, rank_b) = b.size2()?;
    let (rank_a, d_in) = a.size2()?;
    if rank_b != rank_a {
        return Err(CeraError::Shape(format!(
            "B is ({d_out}, {rank_b}) and A is ({rank_a}, {d_in}): B's columns must equal A's rows"
        )));
    }
    let mut values = if rank_b == 0 {
        Vec::new()
    } else {
        let (_, r_b) = Tensor::f_linalg_qr(&b, "r")?;
        let (_, r_a) = Tensor::f_linalg_qr(&a.f_tr()?, "r")?;
        singular_values(&r_b.f_mm(&r_a.f_tr()?)?)?
    };
    values.resize(d_out.min(d_in) as usize, 0.0);
    Spectrum::new(values)
}
