//! Test data from a generator each test seeds for itself. tch's global generator is
//! shared by the tests cargo runs on parallel threads: what one test draws from it
//! depends on when the others draw, so its data (and a tight tolerance on it) would
//! change from run to run.

use tch::{Device, Kind, Tensor};

/// SplitMix64 (Steele, Lea and Flood 2014): small, seeded, the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1): 53 random bits, never 0 (for the log).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal samples (Box-Muller) of `shape`, drawn in float64 and
    /// converted to `options`' kind and device.
    pub fn randn(&mut self, shape: &[i64], options: (Kind, Device)) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect();
        Tensor::from_slice(&values)
            .reshape(shape)
            .to_kind(options.0)
            .to_device(options.1)
    }

    /// A random permutation of `0..n` (Fisher-Yates), as int64.
    pub fn randperm(&mut self, n: i64) -> Tensor {
        let mut values: Vec<i64> = (0..n).collect();
        for i in (1..values.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            values.swap(i, j);
        }
        Tensor::from_slice(&values)
    }
}
