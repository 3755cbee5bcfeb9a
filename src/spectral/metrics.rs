//! `Spectrum`: singular values in descending order and the rank metrics over them.
//!
//! With `s_1 >= s_2 >= ... >= 0` and energies `e_i = s_i^2 / sum s_j^2`:
//! effective rank `exp(-sum p_i ln p_i)`, `p_i = s_i / sum s_j` (Roy & Vetterli);
//! stable rank `sum s_i^2 / s_1^2`; participation ratio `(sum s_i^2)^2 / sum s_i^4`;
//! energy rank `k_tau`, the smallest `k` with `sum_{i<=k} e_i >= tau`; tail energy
//! beyond `r`, `sum_{i>r} e_i`. A zero matrix has rank 0 by every measure and no
//! tail energy. Sums of powers are taken over `s_i / s_1`, so large values cannot
//! overflow.

use crate::error::{CeraError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Spectrum {
    values: Vec<f64>,
}

impl Spectrum {
    /// From singular values in any order; they must be finite and non-negative.
    pub fn new(mut values: Vec<f64>) -> Result<Self> {
        if let Some(bad) = values.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(CeraError::Value(format!(
                "singular values must be finite and non-negative, got {bad}"
            )));
        }
        values.sort_by(|a, b| b.total_cmp(a));
        Ok(Spectrum { values })
    }

    /// Singular values, largest first.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// `s_i / s_1`, or nothing for a zero spectrum.
    fn normalized(&self) -> Option<impl Iterator<Item = f64> + Clone + '_> {
        let top = *self.values.first()?;
        (top > 0.0).then(|| self.values.iter().map(move |s| s / top))
    }

    pub fn effective_rank(&self) -> f64 {
        let total: f64 = self.values.iter().sum();
        if total <= 0.0 {
            return 0.0;
        }
        let entropy: f64 = self
            .values
            .iter()
            .map(|s| s / total)
            .filter(|p| *p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        entropy.exp()
    }

    pub fn stable_rank(&self) -> f64 {
        self.normalized()
            .map_or(0.0, |x| x.map(|v| v * v).sum::<f64>())
    }

    pub fn participation_ratio(&self) -> f64 {
        self.normalized().map_or(0.0, |x| {
            let squares: f64 = x.clone().map(|v| v * v).sum();
            let fourths: f64 = x.map(|v| v.powi(4)).sum();
            squares * squares / fourths
        })
    }

    /// Smallest `k` whose leading `k` values hold at least `tau` of the energy;
    /// `tau` must lie in `(0, 1]`.
    pub fn energy_rank(&self, tau: f64) -> Result<usize> {
        if !(tau > 0.0 && tau <= 1.0) {
            return Err(CeraError::Value(format!(
                "tau must be in (0, 1], got {tau}"
            )));
        }
        let Some(x) = self.normalized() else {
            return Ok(0);
        };
        let cumulative: Vec<f64> = x
            .scan(0.0, |acc, v| {
                *acc += v * v;
                Some(*acc)
            })
            .collect();
        // The last partial sum is the total, summed in the same order: tau = 1 is met.
        let total = *cumulative.last().unwrap_or(&0.0);
        Ok(cumulative.iter().take_while(|c| **c < tau * total).count() + 1)
    }

    /// Share of the energy beyond the first `r` singular values.
    pub fn tail_energy(&self, r: usize) -> f64 {
        self.normalized().map_or(0.0, |x| {
            let squares: Vec<f64> = x.map(|v| v * v).collect();
            let total: f64 = squares.iter().sum();
            let tail: f64 = squares.iter().skip(r).sum();
            // An empty `sum` is -0.0, which reports printed as "-0": give +0.0 instead.
            if tail > 0.0 {
                tail / total
            } else {
                0.0
            }
        })
    }
}
