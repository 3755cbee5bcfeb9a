//! Counter-based dropout mask.
//!
//! Whether element `i` of the `(N, r)` hidden matrix is kept depends only on
//! `(seed, i)`: a SplitMix64 hash of the counter. The backward pass regenerates the
//! mask from the seed instead of storing it, and the CPU loop and the tensor-op
//! version (used on other devices) give the same bits.

use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Bits of the hash compared against the threshold.
const UNIFORM_BITS: u32 = 24;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;

/// A dropout draw: drop probability `p` and the seed the mask is derived from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// Elements whose 24-bit uniform falls below this are dropped.
    pub fn threshold(&self) -> u64 {
        ((self.p * (1u64 << UNIFORM_BITS) as f64).round() as u64).min(1u64 << UNIFORM_BITS)
    }

    /// Inverted-dropout scale applied to kept elements.
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }

    /// Whether element `index` is kept, for a precomputed `threshold()`.
    #[inline(always)]
    pub fn keeps(&self, index: u64, threshold: u64) -> bool {
        uniform24(self.seed, index) >= threshold
    }

    /// The keep mask of `numel` elements as a bool tensor on `device`, built from
    /// the same hash with integer tensor ops (wrapping int64 arithmetic).
    pub fn keep_tensor(&self, numel: i64, device: Device) -> Result<Tensor> {
        let idx = Tensor::f_arange(numel, (Kind::Int64, device))?;
        let z = idx
            .f_add_scalar(1)?
            .f_mul_scalar(GOLDEN as i64)?
            .f_add_scalar(self.seed as i64)?;
        let z = z
            .f_bitwise_xor_tensor(&shift_right(&z, 30)?)?
            .f_mul_scalar(MIX1 as i64)?;
        let z = z
            .f_bitwise_xor_tensor(&shift_right(&z, 27)?)?
            .f_mul_scalar(MIX2 as i64)?;
        let z = z.f_bitwise_xor_tensor(&shift_right(&z, 31)?)?;
        let u = shift_right(&z, 64 - UNIFORM_BITS as i64)?;
        Ok(u.f_ge(self.threshold() as i64)?)
    }
}

/// Logical (unsigned) right shift of an int64 tensor.
fn shift_right(z: &Tensor, bits: i64) -> Result<Tensor> {
    let low_mask = ((1u64 << (64 - bits)) - 1) as i64;
    Ok(z.f_bitwise_right_shift_tensor_scalar(bits)?
        .f_bitwise_and(low_mask)?)
}

/// SplitMix64 of the counter `index + 1` offset by `seed`, top 24 bits.
#[inline(always)]
fn uniform24(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^= z >> 31;
    z >> (64 - UNIFORM_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_probability() {
        let d = Dropout { p: 0.3, seed: 42 };
        let thr = d.threshold();
        let n = 200_000u64;
        let kept = (0..n).filter(|&i| d.keeps(i, thr)).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.005, "kept fraction {kept}");
    }

    #[test]
    fn tensor_mask_equals_loop() {
        for seed in [0u64, 1, 0xDEAD_BEEF_1234_5678, u64::MAX] {
            let d = Dropout { p: 0.25, seed };
            let thr = d.threshold();
            let t = d.keep_tensor(10_000, Device::Cpu).unwrap();
            let from_tensor: Vec<bool> = Vec::<bool>::try_from(&t).unwrap();
            let from_loop: Vec<bool> = (0..10_000).map(|i| d.keeps(i, thr)).collect();
            assert_eq!(from_tensor, from_loop, "seed {seed}");
        }
    }

    #[test]
    fn different_seeds_give_different_masks() {
        let a = Dropout { p: 0.5, seed: 1 };
        let b = Dropout { p: 0.5, seed: 2 };
        let thr = a.threshold();
        let differ = (0..1000)
            .filter(|&i| a.keeps(i, thr) != b.keeps(i, thr))
            .count();
        assert!(differ > 300, "only {differ} of 1000 differ");
    }
}
