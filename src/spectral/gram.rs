//! A streaming accumulator of the `d x d` Gram matrix `G = sum_b X_b^T X_b` of rows
//! seen batch by batch, in float64. Memory is `d^2` doubles however many rows go
//! through; the singular values of the stacked rows are the square roots of `G`'s
//! eigenvalues. Gram matrices of disjoint row sets add, so accumulators merge (and a
//! distributed run all-reduces them) by summation.
//!
//! Only the lower triangle is ever read (the eigensolver is told so), so an update
//! computes `X^T X` one row panel at a time, up to the diagonal block only: one GEMM
//! per panel, about 5/8 of a full GEMM's work at `d = 2048`. Full symmetric matrices
//! go in and out.
//!
//! A centred accumulator also sums the columns, `s = sum_b 1^T X_b`, and gives the
//! spectrum of the rows minus their mean: `G_c = G - s s^T / n`, exact in one pass
//! and still `O(d^2)` memory; column sums of disjoint row sets add like the Gram
//! matrices. (The subtraction loses about `log10(|mean|^2 / variance)` digits of
//! float64's sixteen: harmless for adapter outputs.)

use super::input::{is_finite, real_f64};
use super::metrics::Spectrum;
use crate::error::{CeraError, Result};
use tch::{Device, Kind, Tensor};

/// Row panel height of the lower-triangle update: tall enough for GEMM to run near
/// its peak, short enough that few products fall above the diagonal.
const BLOCK: i64 = 512;

pub struct Gram {
    dim: i64,
    /// Lower triangle (and diagonal blocks) are valid; entries above are never read.
    lower: Tensor,
    /// Column sums, kept only by a centred accumulator.
    sums: Option<Tensor>,
    tokens: u64,
}

impl Gram {
    /// An empty accumulator for rows of `dim` features, kept on `device`.
    pub fn new(dim: i64, device: Device) -> Result<Self> {
        if dim < 1 {
            return Err(CeraError::Value(format!("dim must be >= 1, got {dim}")));
        }
        let lower = Tensor::f_zeros([dim, dim], (Kind::Double, device))?;
        Ok(Gram {
            dim,
            lower,
            sums: None,
            tokens: 0,
        })
    }

    /// An empty accumulator whose spectrum is that of the rows minus their mean.
    pub fn centred(dim: i64, device: Device) -> Result<Self> {
        let mut gram = Self::new(dim, device)?;
        gram.sums = Some(Tensor::f_zeros([dim], (Kind::Double, device))?);
        Ok(gram)
    }

    /// Loads a summed state: a symmetric `(dim, dim)` Gram matrix and its row count.
    pub fn from_matrix(matrix: &Tensor, tokens: u64) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        let full = real_f64(matrix, "Gram matrix")?;
        let size = full.size();
        if size.len() != 2 || size[0] != size[1] || size[0] < 1 {
            return Err(CeraError::Shape(format!(
                "a Gram matrix must be square and non-empty, got {size:?}"
            )));
        }
        // `tril` copies: the caller's tensor is never written to.
        let lower = symmetric_lower(&full, "a Gram matrix")?;
        Ok(Gram {
            dim: size[0],
            lower,
            sums: None,
            tokens,
        })
    }

    /// Makes a loaded state centred, with the summed column sums `sums` (`(dim,)`).
    pub fn with_column_sums(mut self, sums: &Tensor) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        let sums = real_f64(&sums.f_to_device(self.device())?, "column sums")?;
        if sums.size() != [self.dim] {
            return Err(CeraError::Shape(format!(
                "column sums must have shape [{}], got {:?}",
                self.dim,
                sums.size()
            )));
        }
        // `to_kind` may alias a float64 input: copy, so the caller's tensor is never written.
        self.sums = Some(copied(&sums)?);
        Ok(self)
    }

    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// Rows accumulated so far (over every merged accumulator too).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn device(&self) -> Device {
        self.lower.device()
    }

    pub fn is_centred(&self) -> bool {
        self.sums.is_some()
    }

    /// A copy of the column sums of a centred accumulator.
    pub fn column_sums(&self) -> Result<Option<Tensor>> {
        Ok(match &self.sums {
            Some(sums) => Some(copied(sums)?),
            None => None,
        })
    }

    /// Adds the rows of `x` (any leading shape, last dimension `dim`, any real dtype,
    /// any device: they move to the accumulator's). Rejects NaN and infinity before
    /// touching the state.
    pub fn update(&mut self, x: &Tensor) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let rows = real_f64(&x.f_to_device(self.device())?, "update")?;
        let size = rows.size();
        if size.last() != Some(&self.dim) {
            return Err(CeraError::Shape(format!(
                "expected rows of {} features (last dimension), got shape {size:?}",
                self.dim
            )));
        }
        let rows = rows.f_reshape([-1, self.dim])?;
        let n = rows.size()[0];
        if n == 0 {
            return Ok(());
        }
        add_lower_gram(&self.lower, &rows)?;
        if let Some(sums) = &mut self.sums {
            let _ = sums.f_add_(&rows.f_sum_dim_intlist(0, false, Kind::Double)?)?;
        }
        self.tokens += n as u64;
        Ok(())
    }

    /// Adds `other`'s rows: the sum of the two Gram matrices.
    pub fn merge(&mut self, other: &Gram) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        if other.dim != self.dim {
            return Err(CeraError::Shape(format!(
                "cannot merge a Gram of dim {} into one of dim {}",
                other.dim, self.dim
            )));
        }
        if self.is_centred() != other.is_centred() {
            return Err(CeraError::Value(
                "cannot merge a centred accumulator with an uncentred one".into(),
            ));
        }
        let _ = self
            .lower
            .f_add_(&other.lower.f_to_device(self.device())?)?;
        if let (Some(mine), Some(theirs)) = (&mut self.sums, &other.sums) {
            let _ = mine.f_add_(&theirs.f_to_device(mine.device())?)?;
        }
        self.tokens += other.tokens;
        Ok(())
    }

    /// The full symmetric Gram matrix (a copy, float64, on the accumulator's device).
    pub fn matrix(&self) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        symmetric_from_lower(&self.lower)
    }

    /// The singular values of all rows seen (minus their mean, if centred): `sqrt`
    /// of `G`'s (`G_c`'s) eigenvalues, the tiny negative ones rounding leaves clamped
    /// to zero.
    pub fn spectrum(&self) -> Result<Spectrum> {
        let _no_grad = tch::no_grad_guard();
        let mut lower = self.lower.f_tril(0)?;
        if let (Some(sums), true) = (&self.sums, self.tokens > 0) {
            let mean_outer = sums.f_outer(sums)?.f_div_scalar(self.tokens as f64)?;
            lower = lower.f_sub(&mean_outer.f_tril(0)?)?;
        }
        if !is_finite(&lower)? {
            return Err(CeraError::NonFinite(
                "the accumulated Gram matrix overflowed float64; scale the inputs down".into(),
            ));
        }
        let eigenvalues = lower.f_linalg_eigvalsh("L")?;
        let values = eigenvalues
            .f_clamp_min(0.0)?
            .f_sqrt()?
            .f_to_device(Device::Cpu)?;
        Spectrum::new(Vec::<f64>::try_from(&values)?)
    }
}

/// The lower triangle (a copy) of `full`, a square float64 matrix that must be
/// symmetric. Summation order may differ between (i, j) and (j, i) in an
/// all-reduce, so symmetry is checked to rounding, not bit for bit.
pub(crate) fn symmetric_lower(full: &Tensor, what: &str) -> Result<Tensor> {
    let scale = full.f_abs()?.f_max()?.f_double_value(&[])?;
    let skew = full
        .f_sub(&full.f_tr()?)?
        .f_abs()?
        .f_max()?
        .f_double_value(&[])?;
    if skew > 1e-9 * scale {
        return Err(CeraError::Value(format!(
            "{what} must be symmetric; max |G - G^T| is {skew:e} for max |G| {scale:e}"
        )));
    }
    Ok(full.f_tril(0)?)
}

/// The full symmetric matrix whose lower triangle `lower` holds.
pub(crate) fn symmetric_from_lower(lower: &Tensor) -> Result<Tensor> {
    Ok(lower.f_tril(0)? + lower.f_tril(-1)?.f_tr()?)
}

/// Adds `rows^T rows` (rows: `(n, dim)` float64, on `lower`'s device) into the
/// lower triangle and diagonal blocks of `lower`, one row panel per GEMM; entries
/// above the diagonal blocks are left as they were.
pub(crate) fn add_lower_gram(lower: &Tensor, rows: &Tensor) -> Result<()> {
    let dim = lower.size()[0];
    for (start, width) in blocks(dim) {
        let end = start + width;
        let panel = rows.f_narrow(1, start, width)?;
        let mut g = lower.f_narrow(0, start, width)?.f_narrow(1, 0, end)?;
        let _ = g.f_addmm_(&panel.f_tr()?, &rows.f_narrow(1, 0, end)?)?;
    }
    Ok(())
}

fn copied(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_zeros_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// `(start, width)` of each row panel.
fn blocks(dim: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..dim)
        .step_by(BLOCK as usize)
        .map(move |start| (start, BLOCK.min(dim - start)))
}
