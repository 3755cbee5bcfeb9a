//! Counter-based dropout mask.
//!
//! Whether element `i` of the `(N, r)` hidden matrix is kept depends only on
//! `(seed, i)`. The backward pass regenerates the mask from the seed instead of
//! storing it, and the CPU loop and the tensor-op version (used on other devices) give
//! the same bits. The hash is 32-bit (`lowbias32`, two multiplies) so the CPU loop
//! vectorizes: `u = lowbias32(lo32(i) ^ key)` with a key mixed from the seed and the
//! high 32 bits of `i`, and element `i` is kept when the top 24 bits of `u` reach
//! `round(p * 2^24)`.

use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Bits of the hash compared against the threshold.
const UNIFORM_BITS: u32 = 24;
const MUL1: u32 = 0x7FEB_352D;
const MUL2: u32 = 0x846C_A68B;
const LOW32: i64 = 0xFFFF_FFFF;

/// A dropout draw: drop probability `p` and the seed the mask is derived from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// Elements whose 24-bit uniform falls below this are dropped.
    pub fn threshold(&self) -> u32 {
        let scaled = (self.p * (1u64 << UNIFORM_BITS) as f64).round();
        scaled.clamp(0.0, (1u32 << UNIFORM_BITS) as f64) as u32
    }

    /// Inverted-dropout scale applied to kept elements.
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }

    /// The key of the elements whose index has `high` as its upper 32 bits.
    #[inline(always)]
    pub fn key(&self, high: u32) -> u32 {
        lowbias32(self.seed as u32 ^ lowbias32((self.seed >> 32) as u32 ^ lowbias32(high)))
    }

    /// Whether the element with low index bits `low` is kept, given its `key` and
    /// a precomputed `threshold()`.
    #[inline(always)]
    pub fn keeps(low: u32, key: u32, threshold: u32) -> bool {
        lowbias32(low ^ key) >> (32 - UNIFORM_BITS) >= threshold
    }

    /// Whether element `index` is kept (the scalar form of the CPU loop).
    pub fn keeps_index(&self, index: u64) -> bool {
        Self::keeps(
            index as u32,
            self.key((index >> 32) as u32),
            self.threshold(),
        )
    }

    /// The keep mask of `numel` elements as a bool tensor on `device`, built from
    /// the same hash with int64 tensor ops (32-bit arithmetic by masking).
    pub fn keep_tensor(&self, numel: i64, device: Device) -> Result<Tensor> {
        let idx = Tensor::f_arange(numel, (Kind::Int64, device))?;
        let high = idx.f_bitwise_right_shift_tensor_scalar(32)?;
        let seed_hi = i64::from((self.seed >> 32) as u32);
        let seed_lo = i64::from(self.seed as u32);
        let key = lowbias32_tensor(&lowbias32_tensor(&high)?.f_bitwise_xor(seed_hi)?)?;
        let key = lowbias32_tensor(&key.f_bitwise_xor(seed_lo)?)?;
        let low = idx.f_bitwise_and(LOW32)?;
        let u = lowbias32_tensor(&low.f_bitwise_xor_tensor(&key)?)?;
        let uniform = u.f_bitwise_right_shift_tensor_scalar(i64::from(32 - UNIFORM_BITS))?;
        Ok(uniform.f_ge(i64::from(self.threshold()))?)
    }
}

/// Chris Wellons' lowbias32 integer hash: a bijection on u32 with low bias.
#[inline(always)]
fn lowbias32(mut z: u32) -> u32 {
    z ^= z >> 16;
    z = z.wrapping_mul(MUL1);
    z ^= z >> 15;
    z = z.wrapping_mul(MUL2);
    z ^ (z >> 16)
}

/// `lowbias32` over an int64 tensor holding values in `[0, 2^32)`.
fn lowbias32_tensor(z: &Tensor) -> Result<Tensor> {
    let step = |z: &Tensor, shift: i64| -> Result<Tensor> {
        Ok(z.f_bitwise_xor_tensor(&z.f_bitwise_right_shift_tensor_scalar(shift)?)?)
    };
    let z = step(z, 16)?
        .f_mul_scalar(i64::from(MUL1))?
        .f_bitwise_and(LOW32)?;
    let z = step(&z, 15)?
        .f_mul_scalar(i64::from(MUL2))?
        .f_bitwise_and(LOW32)?;
    step(&z, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_probability() {
        let d = Dropout { p: 0.3, seed: 42 };
        let n = 200_000u64;
        let kept = (0..n).filter(|&i| d.keeps_index(i)).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.005, "kept fraction {kept}");
    }

    #[test]
    fn tensor_mask_equals_loop() {
        for seed in [0u64, 1, 0xDEAD_BEEF_1234_5678, u64::MAX] {
            let d = Dropout { p: 0.25, seed };
            let t = d.keep_tensor(10_000, Device::Cpu).unwrap();
            let from_tensor: Vec<bool> = Vec::<bool>::try_from(&t).unwrap();
            let from_loop: Vec<bool> = (0..10_000).map(|i| d.keeps_index(i)).collect();
            assert_eq!(from_tensor, from_loop, "seed {seed}");
        }
    }

    #[test]
    fn high_index_bits_change_the_mask() {
        let d = Dropout { p: 0.5, seed: 9 };
        let differ = (0..1000u64)
            .filter(|&i| d.keeps_index(i) != d.keeps_index(i + (1 << 32)))
            .count();
        assert!(differ > 300, "only {differ} of 1000 differ");
    }

    #[test]
    fn different_seeds_give_different_masks() {
        let a = Dropout { p: 0.5, seed: 1 };
        let b = Dropout {
            p: 0.5,
            seed: 1 << 40,
        };
        let differ = (0..1000)
            .filter(|&i| a.keeps_index(i) != b.keeps_index(i))
            .count();
        assert!(differ > 300, "only {differ} of 1000 differ");
    }
}
