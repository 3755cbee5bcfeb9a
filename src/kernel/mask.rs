//! Counter-based dropout mask.
//!
//! Whether element `i` of the `(N, r)` hidden matrix is kept depends only on
//! `(seed, i)`. The hash is 32-bit (`lowbias32`, two multiplies) so the CPU loop
//! vectorizes: `u = lowbias32(lo32(i) ^ key)` with a key mixed from the seed and the
//! high 32 bits of `i`, and element `i` is kept when the top 24 bits of `u` reach
//! `round(p * 2^24)`. The CPU loops regenerate the bits in backward instead of
//! storing them; the tensor-op path (other devices) builds them once as a bool
//! tensor with the same bits (`keep_tensor`) and backward reuses it.

use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Bits of the hash compared against the threshold.
const UNIFORM_BITS: u32 = 24;
const MUL1: u32 = 0x7FEB_352D;
const MUL2: u32 = 0x846C_A68B;
const SIGN: u32 = 0x8000_0000;
/// Indices per piece of the tensor-op mask: below 2^31 they fit int32, and a piece
/// never straddles a change of the key (every 2^32 indices).
const PIECE: u64 = 1 << 31;

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

    /// The keep mask of `numel` elements as a bool tensor on `device`: the same bits as
    /// `keeps_index`, from 14 int32 tensor ops (see `keep_piece`).
    pub fn keep_tensor(&self, numel: i64, device: Device) -> Result<Tensor> {
        self.keep_range(0, numel.max(0) as u64, device)
    }

    /// The keep bits of flat indices `start..start + len`, built piece by piece so that
    /// every piece's indices fit int32 and share one key.
    fn keep_range(&self, start: u64, len: u64, device: Device) -> Result<Tensor> {
        let end = start + len;
        let mut pieces = Vec::new();
        let mut from = start;
        while from < end {
            let to = end.min((from / PIECE + 1) * PIECE);
            pieces.push(self.keep_piece(from, to - from, device)?);
            from = to;
        }
        Ok(match pieces.len() {
            0 => Tensor::f_empty([0], (Kind::Bool, device))?,
            1 => pieces.swap_remove(0),
            _ => Tensor::f_cat(&pieces, 0)?,
        })
    }

    /// The keep bits of `len` indices from `start`, all inside one `PIECE`.
    ///
    /// int32 tensors hold the hash state (torch has no usable uint32 ops), so a
    /// logical right shift is an arithmetic one and a mask (2 ops), and the final
    /// unsigned comparison flips the sign bit of both sides. The key enters after the
    /// first xorshift (it is linear: `f(low ^ key) = f(low) ^ f(key)`), where the
    /// indices are still non-negative and the shift needs no mask. In-place ops keep
    /// two int32 buffers alive at most.
    fn keep_piece(&self, start: u64, len: u64, device: Device) -> Result<Tensor> {
        let threshold = self.threshold();
        if threshold >> UNIFORM_BITS != 0 {
            // p rounds to 1: no 24-bit uniform reaches 2^24.
            return Ok(Tensor::f_zeros([len as i64], (Kind::Bool, device))?);
        }
        let low = (start % PIECE) as i64;
        let mut z = Tensor::f_arange_start(low, low + len as i64, (Kind::Int, device))?;
        let shifted = z.f_bitwise_right_shift_tensor_scalar(16)?;
        // Indices from 2^31 on carry their bit 31 in the key instead of in `z`.
        let key = self.key((start >> 32) as u32) ^ (start as u32 & SIGN);
        let z = z
            .f_bitwise_xor_tensor_(&shifted)?
            .f_bitwise_xor_(as_i32(xorshift(key, 16)))?
            .f_mul_scalar_(as_i32(MUL1))?;
        let z = xorshift_tensor(z, 15)?.f_mul_scalar_(as_i32(MUL2))?;
        let z = xorshift_tensor(z, 16)?.f_bitwise_xor_(as_i32(SIGN))?;
        Ok(z.f_ge(as_i32((threshold << (32 - UNIFORM_BITS)) ^ SIGN))?)
    }
}

/// Chris Wellons' lowbias32 integer hash: a bijection on u32 with low bias.
#[inline(always)]
fn lowbias32(z: u32) -> u32 {
    let z = xorshift(z, 16).wrapping_mul(MUL1);
    xorshift(xorshift(z, 15).wrapping_mul(MUL2), 16)
}

#[inline(always)]
fn xorshift(z: u32, shift: u32) -> u32 {
    z ^ (z >> shift)
}

/// `xorshift` in place on an int32 tensor holding u32 bits.
fn xorshift_tensor(mut z: Tensor, shift: i64) -> Result<Tensor> {
    let mut shifted = z.f_bitwise_right_shift_tensor_scalar(shift)?;
    let shifted = shifted.f_bitwise_and_(i64::from(u32::MAX >> shift))?;
    Ok(z.f_bitwise_xor_tensor_(&shifted)?)
}

/// The int32 scalar with the bits of `v`.
fn as_i32(v: u32) -> i64 {
    i64::from(v as i32)
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
    fn tensor_mask_equals_loop_across_piece_and_key_boundaries() {
        let d = Dropout { p: 0.4, seed: 77 };
        for start in [PIECE - 300, 2 * PIECE - 300, 3 * PIECE - 10] {
            let t = d.keep_range(start, 600, Device::Cpu).unwrap();
            let from_tensor: Vec<bool> = Vec::<bool>::try_from(&t).unwrap();
            let from_loop: Vec<bool> = (start..start + 600).map(|i| d.keeps_index(i)).collect();
            assert_eq!(from_tensor, from_loop, "from {start}");
        }
    }

    #[test]
    fn probability_rounding_to_one_keeps_nothing_and_empty_is_empty() {
        let d = Dropout {
            p: 1.0 - 1e-9,
            seed: 3,
        };
        let t = d.keep_tensor(1000, Device::Cpu).unwrap();
        assert_eq!(t.f_sum(Kind::Int64).unwrap().int64_value(&[]), 0);
        assert!((0..1000).all(|i| !d.keeps_index(i)));
        let empty = d.keep_tensor(0, Device::Cpu).unwrap();
        assert_eq!((empty.size(), empty.kind()), (vec![0], Kind::Bool));
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
