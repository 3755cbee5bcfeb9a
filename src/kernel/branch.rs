//! Forward and backward of the CeRA branch `delta = scaling * B · Dropout(act(A x))`.
//!
//! GEMMs go through libtorch; the elementwise work between them is one fused pass
//! each way (`elementwise`). Backward needs only the pre-activation `h` and the
//! dropout seed: `act(h)` and `act'(h)` are recomputed in the pass, and so is the
//! mask on CPU; the tensor-op path keeps the hidden mask it built in forward.
//!
//! With the dropout on the input (`DropoutPosition::Input`, as LoRA does it) the
//! branch is `scaling * B · act(A (x ⊙ m))`: the mask `m` over `x`'s `(N, d_in)` elements
//! comes from the same counter hash and seed, applied by the same fused pass (identity
//! activation), and backward regenerates `x ⊙ m` instead of keeping it (on every path:
//! a kept mask would cost `N * d_in` bytes, `d_in / r` times the hidden one).

use super::activation::Activation;
use super::elementwise::{self, Elementwise};
use crate::error::{
    device_name, same_device, same_kind_and_device, tensor_dtype_name, CeraError, Result,
};
use std::str::FromStr;
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

/// Where the dropout mask applies: on the activated hidden vector (the paper's) or
/// on the input before `A` (LoRA's, and the reference's `peft_aligned` variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DropoutPosition {
    #[default]
    Hidden,
    Input,
}

impl FromStr for DropoutPosition {
    type Err = CeraError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "hidden" => Ok(Self::Hidden),
            "input" => Ok(Self::Input),
            other => Err(CeraError::Value(format!(
                "unknown dropout position {other:?}: expected \"hidden\" or \"input\""
            ))),
        }
    }
}

/// What backward needs: the inputs (shared, not copied), `h` and the config.
pub struct Saved {
    pub x: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    /// The pre-activation `x A^T` (or `(x ⊙ m) A^T`), shape `(N, r)` with `N` the
    /// flattened leading dims.
    pub h: Tensor,
    /// The tensor-op path's dropout keep mask, bool `(N, r)`; `None` on the CPU loops
    /// (they hash the bits again) and without dropout.
    pub keep: Option<Tensor>,
    pub elementwise: Elementwise,
    pub position: DropoutPosition,
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

/// `scaling * B · Dropout(act(A x))` (or `scaling * B · act(A Dropout(x))`) for every
/// row of `x` (any leading shape), returned with the state backward needs.
pub fn forward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    ew: &Elementwise,
    position: DropoutPosition,
) -> Result<(Tensor, Saved)> {
    let _no_grad = tch::no_grad_guard();
    let dims = check_inputs(x, a, b)?;
    check_elementwise(ew)?;
    let (hidden, input) = split(ew, position);
    let x2 = dropped_input(&x.f_reshape([dims.n, dims.d_in])?, input)?;
    let h = x2.f_mm(&a.f_tr()?)?;
    let (act, keep) = elementwise::forward(&h, &hidden)?;
    let y = act.f_mm(&b.f_tr()?)?.f_reshape(out_shape(x, dims.d_out))?;
    let saved = Saved {
        x: x.shallow_clone(),
        a: a.shallow_clone(),
        b: b.shallow_clone(),
        h,
        keep,
        elementwise: *ew,
        position,
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
        keep,
        elementwise: ew,
        position,
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
    same_kind_and_device(grad, "grad_output", x, "the branch's inputs")?;
    same_kind_and_device(h, "the saved hidden state", x, "the branch's inputs")?;
    if h.size() != [dims.n, dims.r] {
        return Err(CeraError::Shape(format!(
            "saved hidden state has shape {:?}, expected [{}, {}]",
            h.size(),
            dims.n,
            dims.r
        )));
    }
    let (hidden, input) = split(ew, *position);
    let g2 = grad.f_reshape([dims.n, dims.d_out])?;
    let gb = g2.f_mm(b)?;
    let (am, dz) = elementwise::backward(h, &gb, &hidden, keep.as_ref())?;
    let db = needs.b.then(|| g2.f_tr()?.f_mm(&am)).transpose()?;
    let da = needs
        .a
        .then(|| {
            let x2 = dropped_input(&x.f_reshape([dims.n, dims.d_in])?, input)?;
            Ok::<_, CeraError>(dz.f_tr()?.f_mm(&x2)?)
        })
        .transpose()?;
    let dx = needs
        .x
        .then(|| Ok::<_, CeraError>(dropped_input(&dz.f_mm(a)?, input)?.f_reshape(x.size())?))
        .transpose()?;
    Ok(Grads {
        x: dx,
        a: da,
        b: db,
    })
}

/// The hidden pass's config and the input's dropout, for the dropout's position.
fn split(ew: &Elementwise, position: DropoutPosition) -> (Elementwise, Option<Elementwise>) {
    match position {
        DropoutPosition::Hidden => (*ew, None),
        DropoutPosition::Input => (
            Elementwise {
                dropout: None,
                ..*ew
            },
            ew.dropout.map(|d| Elementwise {
                activation: Activation::Identity,
                scaling: 1.0,
                dropout: Some(d),
                tensor_ops: ew.tensor_ops,
            }),
        ),
    }
}

/// `t ⊙ m` for the input mask `m` over `t`'s `(N, d_in)` elements (the forward's
/// `x ⊙ m` and backward's `(dz A) ⊙ m` draw the same mask), or `t` itself.
fn dropped_input(t: &Tensor, input: Option<Elementwise>) -> Result<Tensor> {
    match input {
        None => Ok(t.shallow_clone()),
        Some(ew) => Ok(elementwise::forward(t, &ew)?.0),
    }
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
    if !same_device(a, x) || !same_device(b, x) {
        return Err(CeraError::Device(format!(
            "mixed devices: x is on {}, A on {}, B on {}",
            device_name(x),
            device_name(a),
            device_name(b)
        )));
    }
    let kinds = [x.f_kind()?, a.f_kind()?, b.f_kind()?];
    if !matches!(
        kinds[0],
        Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half
    ) {
        return Err(CeraError::DType(format!(
            "x has dtype {}: expected torch.float32, torch.float64, torch.bfloat16 or \
             torch.float16",
            tensor_dtype_name(x)
        )));
    }
    if kinds[1] != kinds[0] || kinds[2] != kinds[0] {
        return Err(CeraError::DType(format!(
            "mixed dtypes: x is {}, A is {}, B is {}",
            tensor_dtype_name(x),
            tensor_dtype_name(a),
            tensor_dtype_name(b)
        )));
    }
    let n = xs[..xs.len() - 1].iter().product();
    Ok(Dims { n, d_in, r, d_out })
}
