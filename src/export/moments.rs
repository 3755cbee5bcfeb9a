//! Streaming second moments of a layer's input `x` (`d_in`) and its adapter's output
//! delta `y` (`d_out`), in float64: `Cxx = sum x x^T`, `Cyx = sum y x^T`, the column
//! sums of `x` and `y`, `sum ||y||^2` and the token count. They are all a linear
//! regression of `y` on `x` needs, at every rank, in memory that does not grow with
//! the number of tokens (`d_in^2 + d_out d_in` doubles). Sums over disjoint tokens
//! add, so accumulators merge (and a distributed run all-reduces them) by summation.
//!
//! `Cxx` is filled one row panel at a time, lower triangle only, by the Gram
//! accumulator's panel routine.

use crate::error::{CeraError, Result};
use crate::spectral::gram::{add_lower_gram, symmetric_from_lower, symmetric_lower};
use crate::spectral::input::real_f64;
use tch::{Device, Kind, Tensor};

pub struct Moments {
    d_in: i64,
    d_out: i64,
    /// `sum x x^T`: lower triangle (and diagonal blocks) valid, the rest never read.
    xx_lower: Tensor,
    /// `sum y x^T`, `(d_out, d_in)`.
    yx: Tensor,
    sum_x: Tensor,
    sum_y: Tensor,
    /// `sum ||y||^2`, a 0-d tensor: kept on the device so updates never synchronise.
    sum_yy: Tensor,
    tokens: u64,
}

/// The summed state of a `Moments`, full matrices, float64: what an all-reduce sums.
pub struct MomentsState {
    pub xx: Tensor,
    pub yx: Tensor,
    pub sum_x: Tensor,
    pub sum_y: Tensor,
    pub sum_yy: Tensor,
    pub tokens: u64,
}

impl Moments {
    /// An empty accumulator for inputs of `d_in` and outputs of `d_out` features,
    /// kept on `device`.
    pub fn new(d_in: i64, d_out: i64, device: Device) -> Result<Self> {
        if d_in < 1 || d_out < 1 {
            return Err(CeraError::Value(format!(
                "d_in and d_out must be >= 1, got {d_in} and {d_out}"
            )));
        }
        let f64_on = (Kind::Double, device);
        Ok(Moments {
            d_in,
            d_out,
            xx_lower: Tensor::f_zeros([d_in, d_in], f64_on)?,
            yx: Tensor::f_zeros([d_out, d_in], f64_on)?,
            sum_x: Tensor::f_zeros([d_in], f64_on)?,
            sum_y: Tensor::f_zeros([d_out], f64_on)?,
            sum_yy: Tensor::f_zeros([], f64_on)?,
            tokens: 0,
        })
    }

    /// Loads a summed state (e.g. an all-reduced one); the tensors are copied and
    /// moved to the device of `state.xx`.
    pub fn from_state(state: &MomentsState) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        let xx = real_f64(&state.xx, "xx")?;
        let device = xx.device();
        let on = |t: &Tensor, what: &str| real_f64(&t.f_to_device(device)?, what);
        let (yx, sum_x, sum_y, sum_yy) = (
            on(&state.yx, "yx")?,
            on(&state.sum_x, "sum_x")?,
            on(&state.sum_y, "sum_y")?,
            on(&state.sum_yy, "sum_yy")?,
        );
        let (xs, ys) = (xx.size(), yx.size());
        let (d_in, d_out) = match (xs.as_slice(), ys.as_slice()) {
            ([a, b], [o, i]) if a == b && *a >= 1 && i == a && *o >= 1 => (*a, *o),
            _ => {
                return Err(CeraError::Shape(format!(
                    "xx must be (d_in, d_in) and yx (d_out, d_in), got {xs:?} and {ys:?}"
                )))
            }
        };
        for (t, want, what) in [
            (&sum_x, vec![d_in], "sum_x"),
            (&sum_y, vec![d_out], "sum_y"),
            (&sum_yy, vec![], "sum_yy"),
        ] {
            if t.size() != want {
                return Err(CeraError::Shape(format!(
                    "{what} must have shape {want:?}, got {:?}",
                    t.size()
                )));
            }
        }
        if sum_yy.f_double_value(&[])? < 0.0 {
            return Err(CeraError::Value("sum_yy must be >= 0".into()));
        }
        Ok(Moments {
            d_in,
            d_out,
            xx_lower: symmetric_lower(&xx, "xx")?,
            yx: yx.f_detach_copy()?,
            sum_x: sum_x.f_detach_copy()?,
            sum_y: sum_y.f_detach_copy()?,
            sum_yy: sum_yy.f_detach_copy()?,
            tokens: state.tokens,
        })
    }

    pub fn d_in(&self) -> i64 {
        self.d_in
    }

    pub fn d_out(&self) -> i64 {
        self.d_out
    }

    /// Tokens accumulated so far (over every merged accumulator too).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn device(&self) -> Device {
        self.yx.device()
    }

    /// Adds the token pairs of `x` (`(..., d_in)`) and `y` (`(..., d_out)`, the same
    /// leading shape). Any real dtype and device; both are checked (NaN, infinity,
    /// shapes) before the state is touched.
    pub fn update(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let device = self.device();
        let x = real_f64(&x.f_to_device(device)?, "x")?;
        let y = real_f64(&y.f_to_device(device)?, "y")?;
        let (xs, ys) = (x.size(), y.size());
        let fits = xs.last() == Some(&self.d_in)
            && ys.last() == Some(&self.d_out)
            && xs[..xs.len() - 1] == ys[..ys.len() - 1];
        if !fits {
            return Err(CeraError::Shape(format!(
                "expected x of shape (..., {}) and y of shape (..., {}) with the same leading \
                 dimensions, got {xs:?} and {ys:?}",
                self.d_in, self.d_out
            )));
        }
        let x = x.f_reshape([-1, self.d_in])?;
        let y = y.f_reshape([-1, self.d_out])?;
        let n = x.size()[0];
        if n == 0 {
            return Ok(());
        }
        add_lower_gram(&self.xx_lower, &x)?;
        let _ = self.yx.f_addmm_(&y.f_tr()?, &x)?;
        let _ = self
            .sum_x
            .f_add_(&x.f_sum_dim_intlist(0, false, Kind::Double)?)?;
        let _ = self
            .sum_y
            .f_add_(&y.f_sum_dim_intlist(0, false, Kind::Double)?)?;
        let _ = self.sum_yy.f_add_(&y.f_square()?.f_sum(Kind::Double)?)?;
        self.tokens += n as u64;
        Ok(())
    }

    /// Adds `other`'s tokens.
    pub fn merge(&mut self, other: &Moments) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        if (other.d_in, other.d_out) != (self.d_in, self.d_out) {
            return Err(CeraError::Shape(format!(
                "cannot merge moments of (d_in, d_out) = ({}, {}) into ({}, {})",
                other.d_in, other.d_out, self.d_in, self.d_out
            )));
        }
        let device = self.device();
        for (mine, theirs) in [
            (&mut self.xx_lower, &other.xx_lower),
            (&mut self.yx, &other.yx),
            (&mut self.sum_x, &other.sum_x),
            (&mut self.sum_y, &other.sum_y),
            (&mut self.sum_yy, &other.sum_yy),
        ] {
            let _ = mine.f_add_(&theirs.f_to_device(device)?)?;
        }
        self.tokens += other.tokens;
        Ok(())
    }

    /// A copy of the summed state, full symmetric `xx`, on the accumulator's device.
    pub fn state(&self) -> Result<MomentsState> {
        let _no_grad = tch::no_grad_guard();
        Ok(MomentsState {
            xx: symmetric_from_lower(&self.xx_lower)?,
            yx: self.yx.f_detach_copy()?,
            sum_x: self.sum_x.f_detach_copy()?,
            sum_y: self.sum_y.f_detach_copy()?,
            sum_yy: self.sum_yy.f_detach_copy()?,
            tokens: self.tokens,
        })
    }
}
