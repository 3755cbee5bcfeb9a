//! The best linear map of `x` to `y` from streamed moments, at every rank at once.
//!
//! Full rank: `W* = Cyx Cxx^+` (least squares, the minimum-norm solution when `Cxx`
//! is singular), or `Cyx (Cxx + lambda I)^-1` with a ridge. Rank `k`: reduced-rank
//! regression keeps `W_k = U_k U_k^T W*`, `U_k` the top-`k` eigenvectors of the
//! fitted outputs' second moment `M = W* Cxx W*^T`; for least squares that is the
//! optimum over all rank-`k` maps, since `E||y - W x||^2 = E||y - W* x||^2 +
//! E||(W* - W) x||^2`. The error of every `W_k` comes from the moments alone:
//!
//! `sum ||y - W_k x||^2 = sum ||y||^2 - sum_{i<=k} (2 u_i^T W* Cxy u_i - u_i^T M u_i)`
//!
//! and `linearity(k) = 1 - that / sum ||y||^2`. With `bias`, `x` and `y` are centred
//! first and `b_k = mean(y) - W_k mean(x)`; the denominator stays `sum ||y||^2`.
//! Cost: two symmetric eigendecompositions (`d_in`, `d_out`) and a few GEMMs.

use super::moments::Moments;
use crate::error::{CeraError, Result};
use crate::spectral::input::is_finite;
use crate::spectral::Spectrum;
use tch::{Device, Kind, Tensor};

/// How `solve` regularises `Cxx`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Solve {
    /// `0`: pseudo-inverse (eigenvalues at or below `d_in * eps * max` are dropped,
    /// as `torch.linalg.pinv` does). `> 0`: adds `ridge * mean eigenvalue` of `Cxx`
    /// to its diagonal, so the value is free of the inputs' scale.
    pub ridge: f64,
    /// Fit `y ~ W x + b` (centred moments) rather than `y ~ W x`.
    pub bias: bool,
}

/// The solution for one layer: `W*`, the fitted-output eigenbasis and the
/// linearity of every rank.
pub struct Fit {
    weight: Tensor,
    /// `(d_out, d_out)`, columns by descending fitted energy.
    basis: Tensor,
    /// `(mean x, mean y)` with `bias`.
    means: Option<(Tensor, Tensor)>,
    /// Eigenvalues of `M / tokens`, descending.
    fitted: Vec<f64>,
    linearity: Vec<f64>,
    mean_square: f64,
    tokens: u64,
}

fn is_zero(t: &Tensor) -> Result<bool> {
    Ok(t.f_abs()?.f_max()?.f_double_value(&[])? == 0.0)
}

/// `U diag(values) U^T` in descending order of `values` for a symmetric `m`.
fn eigh_descending(m: &Tensor) -> Result<(Tensor, Tensor)> {
    let (values, vectors) = m.f_linalg_eigh("L")?;
    Ok((values.f_flip([0])?, vectors.f_flip([1])?))
}

impl Moments {
    /// Solves for `W*` and every rank's linearity from the tokens seen so far.
    pub fn solve(&self, how: Solve) -> Result<Fit> {
        let _no_grad = tch::no_grad_guard();
        if !(how.ridge.is_finite() && how.ridge >= 0.0) {
            return Err(CeraError::Value(format!(
                "ridge must be finite and >= 0, got {}",
                how.ridge
            )));
        }
        let state = self.state()?;
        if state.tokens == 0 {
            return Err(CeraError::Value(
                "no tokens accumulated: nothing to fit".into(),
            ));
        }
        let n = state.tokens as f64;
        let sum_yy = state.sum_yy.f_double_value(&[])?;
        // Second moments per token: the same solution, and values of order one.
        let mut cxx = state.xx.f_div_scalar(n)?;
        let mut cyx = state.yx.f_div_scalar(n)?;
        let mut syy = sum_yy / n;
        let means = if how.bias {
            let mx = state.sum_x.f_div_scalar(n)?;
            let my = state.sum_y.f_div_scalar(n)?;
            cxx = cxx.f_sub(&mx.f_outer(&mx)?)?;
            cyx = cyx.f_sub(&my.f_outer(&mx)?)?;
            syy -= my.f_dot(&my)?.f_double_value(&[])?;
            Some((mx, my))
        } else {
            None
        };
        for (t, what) in [(&cxx, "Cxx"), (&cyx, "Cyx")] {
            if !is_finite(t)? || !syy.is_finite() {
                return Err(CeraError::NonFinite(format!(
                    "the accumulated {what} overflowed float64; scale the inputs down"
                )));
            }
        }

        let (lambda, v) = eigh_descending(&cxx)?;
        let lambda = lambda.f_clamp_min(0.0)?;
        let top = lambda.f_max()?.f_double_value(&[])?;
        let inverse = if how.ridge > 0.0 {
            let shift = how.ridge * lambda.f_mean(Kind::Double)?.f_double_value(&[])?;
            if shift > 0.0 {
                lambda.f_add_scalar(shift)?.f_reciprocal()?
            } else {
                lambda.f_zeros_like()?
            }
        } else {
            let cutoff = top * self.d_in() as f64 * f64::EPSILON;
            let kept = lambda.f_gt(cutoff)?;
            // Dropped eigenvalues get 1 in the division, then 0 by the mask.
            let safe = lambda.f_where_self(&kept, &lambda.f_ones_like()?)?;
            safe.f_reciprocal()?.f_mul(&kept.f_to_kind(Kind::Double)?)?
        };
        // G = Cyx V; W* = G diag(inv) V^T; W* Cxy = G diag(inv) G^T;
        // M = W* Cxx W*^T = G diag(lambda inv^2) G^T.
        let g = cyx.f_mm(&v)?;
        let g_inv = g.f_mul(&inverse)?;
        let weight = g_inv.f_mm(&v.f_tr()?)?;
        let cross = g_inv.f_mm(&g.f_tr()?)?;
        let m = g
            .f_mul(&lambda.f_mul(&inverse.f_square()?)?)?
            .f_mm(&g.f_tr()?)?;
        // Symmetric up to rounding; eigh reads the lower triangle.
        let (mu, basis) = eigh_descending(&m)?;
        let fitted: Vec<f64> = Vec::try_from(&mu.f_clamp_min(0.0)?.f_to_device(Device::Cpu)?)?;
        let cross_diag =
            basis
                .f_mul(&cross.f_mm(&basis)?)?
                .f_sum_dim_intlist(0, false, Kind::Double)?;
        let m_diag = basis
            .f_mul(&m.f_mm(&basis)?)?
            .f_sum_dim_intlist(0, false, Kind::Double)?;
        let gain = cross_diag.f_mul_scalar(2.0)?.f_sub(&m_diag)?;
        let gain: Vec<f64> = Vec::try_from(&gain.f_to_device(Device::Cpu)?)?;

        let ranks = self.d_in().min(self.d_out()) as usize;
        let total = sum_yy / n;
        let mut linearity = Vec::with_capacity(ranks + 1);
        let mut error = syy;
        for k in 0..=ranks {
            if k > 0 {
                error -= gain[k - 1];
            }
            // An all-zero delta is reproduced exactly by W = 0.
            linearity.push(if total > 0.0 {
                1.0 - error / total
            } else {
                1.0
            });
        }
        Ok(Fit {
            weight,
            basis,
            means,
            fitted,
            linearity,
            mean_square: total,
            tokens: state.tokens,
        })
    }
}

impl Fit {
    /// `W*`, `(d_out, d_in)`, float64.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `linearity[k]` for `k = 0..=min(d_in, d_out)`: the share of `E||y||^2` that
    /// the rank-`k` map explains (`linearity[0]` is what the bias alone explains).
    pub fn linearity(&self) -> &[f64] {
        &self.linearity
    }

    /// `E||y||^2`, per token.
    pub fn mean_square(&self) -> f64 {
        self.mean_square
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The spectrum of the fitted outputs `W* x` over the tokens (per token): its
    /// energy ranks say how much rank the linear part needs.
    pub fn fitted_spectrum(&self) -> Result<Spectrum> {
        Spectrum::new(self.fitted.iter().map(|m| m.sqrt()).collect())
    }

    /// `linearity[k]` of every rank's map on other tokens, given as their moments
    /// (a held-out split): the calibration's own linearity flatters the fit when the
    /// tokens are not many times `d_in`, since `W*` then fits noise too. The same
    /// sum over eigen-directions as `solve`, with the held-out moments taken about
    /// the fit's means (zero without a bias); the denominator is the held-out
    /// `E||y||^2`. It can fall below zero: a map worse than none.
    pub fn linearity_on(&self, held_out: &Moments) -> Result<Vec<f64>> {
        let _no_grad = tch::no_grad_guard();
        let (d_out, d_in) = (self.weight.size()[0], self.weight.size()[1]);
        if held_out.d_in() != d_in || held_out.d_out() != d_out {
            return Err(CeraError::Shape(format!(
                "held-out moments are for d_in={}, d_out={}; the fit maps d_in={d_in} to \
                 d_out={d_out}",
                held_out.d_in(),
                held_out.d_out()
            )));
        }
        let state = held_out.state()?;
        if state.tokens == 0 {
            return Err(CeraError::Value(
                "no held-out tokens accumulated: nothing to score".into(),
            ));
        }
        let device = self.weight.device();
        let n = state.tokens as f64;
        let per_token = |t: &Tensor| t.f_to_device(device)?.f_div_scalar(n);
        let (exx, eyx) = (per_token(&state.xx)?, per_token(&state.yx)?);
        let total = state.sum_yy.f_double_value(&[])? / n;
        for (t, what) in [(&exx, "Cxx"), (&eyx, "Cyx")] {
            if !is_finite(t)? || !total.is_finite() {
                return Err(CeraError::NonFinite(format!(
                    "the held-out {what} overflowed float64; scale the inputs down"
                )));
            }
        }
        if total <= 0.0 {
            // All-zero held-out deltas: the zero map (an untrained adapter's fit) is
            // exact, as `solve` counts it; any other map has no share to be scored by.
            let zero_map = is_zero(&self.weight)?
                && match &self.means {
                    Some((_, my)) => is_zero(my)?,
                    None => true,
                };
            if zero_map {
                return Ok(vec![1.0; self.linearity.len()]);
            }
            return Err(CeraError::Value(
                "the held-out deltas are all zero and the fitted map is not: linearity is \
                 undefined"
                    .into(),
            ));
        }
        // E[x~ x~^T], E[y~ x~^T], E||y~||^2 for x~ = x - mx, y~ = y - my.
        let (cxx, cyx, syy) = match &self.means {
            None => (exx, eyx, total),
            Some((mx, my)) => {
                let (hx, hy) = (per_token(&state.sum_x)?, per_token(&state.sum_y)?);
                let cxx = exx
                    .f_sub(&hx.f_outer(mx)?)?
                    .f_sub(&mx.f_outer(&hx)?)?
                    .f_add(&mx.f_outer(mx)?)?;
                let cyx = eyx
                    .f_sub(&hy.f_outer(mx)?)?
                    .f_sub(&my.f_outer(&hx)?)?
                    .f_add(&my.f_outer(mx)?)?;
                let syy = total - 2.0 * my.f_dot(&hy)?.f_double_value(&[])?
                    + my.f_dot(my)?.f_double_value(&[])?;
                (cxx, cyx, syy)
            }
        };
        let cross = self.weight.f_mm(&cyx.f_tr()?)?;
        let m = self.weight.f_mm(&cxx)?.f_mm(&self.weight.f_tr()?)?;
        let diag = |t: &Tensor| -> Result<Vec<f64>> {
            let d = self.basis.f_mul(&t.f_mm(&self.basis)?)?.f_sum_dim_intlist(
                0,
                false,
                Kind::Double,
            )?;
            Ok(Vec::try_from(&d.f_to_device(Device::Cpu)?)?)
        };
        let (cross_diag, m_diag) = (diag(&cross)?, diag(&m)?);
        let mut error = syy;
        let mut linearity = Vec::with_capacity(self.linearity.len());
        for k in 0..self.linearity.len() {
            if k > 0 {
                error -= 2.0 * cross_diag[k - 1] - m_diag[k - 1];
            }
            linearity.push(1.0 - error / total);
        }
        Ok(linearity)
    }

    /// The rank-`k` map as LoRA factors `(B, A, b)`: `B A = W_k`, `B` `(d_out, k)`,
    /// `A` `(k, d_in)`, balanced (both carry the square roots of `W_k`'s singular
    /// values), and the bias `b` when the fit has one. Float64.
    pub fn factors(&self, k: usize) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let _no_grad = tch::no_grad_guard();
        let ranks = self.linearity.len() - 1;
        if k < 1 || k > ranks {
            return Err(CeraError::Value(format!(
                "rank must be in 1..={ranks} (min(d_in, d_out)), got {k}"
            )));
        }
        let u = self.basis.f_narrow(1, 0, k as i64)?;
        let projected = u.f_tr()?.f_mm(&self.weight)?;
        // projected = P S Q^T, so W_k = (U P sqrt S)(sqrt S Q^T).
        let (p, s, q) = projected.f_svd(true, true)?;
        let root = s.f_sqrt()?;
        let b = u.f_mm(&p)?.f_mul(&root)?;
        let a = q.f_mul(&root)?.f_tr()?;
        let bias = match &self.means {
            Some((mx, my)) => Some(my.f_sub(&b.f_mv(&a.f_mv(mx)?)?)?),
            None => None,
        };
        Ok((b, a, bias))
    }
}
