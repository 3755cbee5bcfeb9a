//! Forward and backward of the CeRA branch `delta = scaling * B · Dropout(act(A x))`.
//!
//! GEMMs go through libtorch; the elementwise work between them is one fused pass
//! each way (`elementwise`). Backward needs only the pre-activation `h = x A^T` and
//! the dropout seed: the mask, `act(h)` and `act'(h)` are recomputed in the pass.

use super::elementwise::{self, Elementwise};
use crate::error::{CeraError, Result};
use tch::{Kind, Tensor};

/// Which gradients the caller wants; the GEMMs of the others are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub x: bool,
    pub a: bool,
    pub b: bool,
}

impl Needs {
    pub const ALL: Needs = Needs {
        x: true,
        a: true,
        b: true,
    };
}

/// What backward needs: the inputs (shared, not copied), `h` and the config.
pub struct Saved {
    pub x: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    /// The pre-activation `x A^T`, shape `(N, r)` with `N` the flattened leading dims.
    pub h: Tensor,
    pub elementwise: Elementwise,
}

/// Gradients of the branch's inputs; `None` where not asked for.
pub struct Grads {
    pub x: Option<Tensor>,
    pub a: Option<Tensor>,
    pub b: Option<Tensor>,
}

/// Shapes of one call: `N` rows of `d_in` in, `d_out` out, rank `r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    n: i64,
    d_in: i64,
    r: i64,
    d_out: i64,
}

/// `scaling * B · Dropout(act(A x))` for every row of `x` (any leading shape),
/// returned with the state backward needs.
pub fn forward(x: &Tensor, a: &Tensor, b: &Tensor, ew: &Elementwise) -> Result<(Tensor, Saved)> {
    let _no_grad = tch::no_grad_guard();
    let dims = check_inputs(x, a, b)?;
    check_elementwise(ew)?;
    let x2 = x.f_reshape([dims.n, dims.d_in])?;
    let h = x2.f_mm(&a.f_tr()?)?;
    let act = elementwise::forward(&h, ew)?;
    let y = act.f_mm(&b.f_tr()?)?.f_reshape(out_shape(x, dims.d_out))?;
    let saved = Saved {
        x: x.shallow_clone(),
        a: a.shallow_clone(),
        b: b.shallow_clone(),
        h,
        elementwise: *ew,
    };
    Ok((y, saved))
}

/// Gradients of `x`, `A` and `B` given the gradient of the branch output.
pub fn backward(grad: &Tensor, saved: &Saved, needs: Needs) -> Result<Grads> {
    let _no_grad = tch::no_grad_guard();
    let Saved {
        x,
        a,
        b,
        h,
        elementwise: ew,
    } = saved;
    let dims = check_inputs(x, a, b)?;
    let expected = out_shape(x, dims.d_out);
    if grad.size() != expected {
        return Err(CeraError::Shape(format!(
            "grad_output has shape {:?}, the branch output has {:?}",
            grad.size(),
            expected
        )));
    }
    same_kind_and_device(grad, "grad_output", x, "the branch output")?;
    same_kind_and_device(h, "the saved hidden state", x, "the inputs")?;
    if h.size() != [dims.n, dims.r] {
        return Err(CeraError::Shape(format!(
            "saved hidden state has shape {:?}, expected [{}, {}]",
            h.size(),
            dims.n,
            dims.r
        )));
    }
    let g2 = grad.f_reshape([dims.n, dims.d_out])?;
    let gb = g2.f_mm(b)?;
    let (am, dz) = elementwise::backward(h, &gb, ew)?;
    let db = needs.b.then(|| g2.f_tr()?.f_mm(&am)).transpose()?;
    let da = needs
        .a
        .then(|| dz.f_tr()?.f_mm(&x.f_reshape([dims.n, dims.d_in])?))
        .transpose()?;
    let dx = needs
        .x
        .then(|| dz.f_mm(a)?.f_reshape(x.size()))
        .transpose()?;
    Ok(Grads {
        x: dx,
        a: da,
        b: db,
    })
}

/// Errors unless `t` has the dtype and device of `like`; the CPU loops read buffers of
/// one element type, so a mismatch must never reach them.
pub(super) fn same_kind_and_device(
    t: &Tensor,
    what: &str,
    like: &Tensor,
    like_what: &str,
) -> Result<()> {
    let (kind, like_kind) = (t.f_kind()?, like.f_kind()?);
    if kind != like_kind || t.device() != like.device() {
        return Err(CeraError::DType(format!(
            "{what} is {kind:?} on {:?}, {like_what} {like_kind:?} on {:?}",
            t.device(),
            like.device()
        )));
    }
    Ok(())
}

fn out_shape(x: &Tensor, d_out: i64) -> Vec<i64> {
    let mut shape = x.size();
    if let Some(last) = shape.last_mut() {
        *last = d_out;
    }
    shape
}

fn check_elementwise(ew: &Elementwise) -> Result<()> {
    if !ew.scaling.is_finite() {
        return Err(CeraError::Value(format!(
            "scaling must be finite, got {}",
            ew.scaling
        )));
    }
    if let Some(d) = ew.dropout {
        if !(0.0..1.0).contains(&d.p) {
            return Err(CeraError::Value(format!(
                "dropout must be in [0, 1), got {}",
                d.p
            )));
        }
    }
    Ok(())
}

fn check_inputs(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Dims> {
    let (xs, as_, bs) = (x.size(), a.size(), b.size());
    if xs.is_empty() {
        return Err(CeraError::Shape(
            "x must have at least one dimension (..., d_in), got a scalar".into(),
        ));
    }
    if as_.len() != 2 || bs.len() != 2 {
        return Err(CeraError::Shape(format!(
            "A must be (r, d_in) and B (d_out, r), got A {as_:?} and B {bs:?}"
        )));
    }
    let d_in = xs[xs.len() - 1];
    let (r, d_out) = (as_[0], bs[0]);
    if as_[1] != d_in {
        return Err(CeraError::Shape(format!(
            "x has last dimension {d_in} but A is {as_:?} (expects d_in = {})",
            as_[1]
        )));
    }
    if bs[1] != r {
        return Err(CeraError::Shape(format!(
            "rank mismatch: A is {as_:?} (r = {r}) but B is {bs:?} (r = {})",
            bs[1]
        )));
    }
    let kinds = [x.f_kind()?, a.f_kind()?, b.f_kind()?];
    if !matches!(
        kinds[0],
        Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half
    ) {
        return Err(CeraError::DType(format!(
            "x has dtype {:?}: expected float32, float64, bfloat16 or float16",
            kinds[0]
        )));
    }
    if kinds[1] != kinds[0] || kinds[2] != kinds[0] {
        return Err(CeraError::DType(format!(
            "mixed dtypes: x is {:?}, A is {:?}, B is {:?}",
            kinds[0], kinds[1], kinds[2]
        )));
    }
    let devices = [x.device(), a.device(), b.device()];
    if devices[1] != devices[0] || devices[2] != devices[0] {
        return Err(CeraError::Device(format!(
            "mixed devices: x is on {:?}, A on {:?}, B on {:?}",
            devices[0], devices[1], devices[2]
        )));
    }
    let n = xs[..xs.len() - 1].iter().product();
    Ok(Dims { n, d_in, r, d_out })
}
