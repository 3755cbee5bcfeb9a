//! Checks shared by every entry point: real dtype, finite values, the shape a
//! routine needs. Inputs are detached so no autograd graph ever grows from here.
//!
//! tch's `size()` panics on tensors without sizes (nested ones), so shapes are read
//! only after `real_f64`, whose fallible ops reject such tensors first.

use crate::error::{dtype_name, CeraError, Result};
use tch::{Kind, Tensor};

/// `t` detached and converted to float64 on its own device, after checking that it
/// holds real numbers and no NaN or infinity. `what` names it in errors.
pub fn real_f64(t: &Tensor, what: &str) -> Result<Tensor> {
    let kind = t.f_kind()?;
    if !(t.is_floating_point() || is_integral(kind)) {
        return Err(CeraError::DType(format!(
            "{what} must hold real numbers, got {}",
            dtype_name(kind)
        )));
    }
    let t = t.f_detach()?.f_to_kind(Kind::Double)?;
    check_finite(&t, what)?;
    Ok(t)
}

/// `real_f64` for a matrix: exactly two dimensions.
pub fn matrix_f64(t: &Tensor, what: &str) -> Result<Tensor> {
    let m = real_f64(t, what)?;
    let size = m.size();
    if size.len() != 2 {
        return Err(CeraError::Shape(format!(
            "{what} must be a 2-D matrix, got {} dimensions {size:?}",
            size.len()
        )));
    }
    Ok(m)
}

/// Whether every value of `t` is finite. A NaN or an infinity makes the sum
/// non-finite, so a finite sum proves it in one fast pass; only a non-finite sum
/// (which finite values can also reach by overflow) needs the elementwise test.
pub fn is_finite(t: &Tensor) -> Result<bool> {
    if t.f_sum(Kind::Double)?.f_double_value(&[])?.is_finite() {
        return Ok(true);
    }
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

/// Errors when `t` holds a NaN or an infinity.
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    if !is_finite(t)? {
        return Err(CeraError::NonFinite(format!(
            "{what} contains NaN or infinite values; spectra are defined for finite matrices only"
        )));
    }
    Ok(())
}

fn is_integral(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    )
}
