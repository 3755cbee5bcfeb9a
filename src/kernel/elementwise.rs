//! The fused elementwise passes between the branch's GEMMs.
//!
//! Forward: `a = scaling * mask * act(h)` in one pass over `h`.
//! Backward: `am = scaling * mask * act(h)` (for dB) and
//! `dz = scaling * mask * act'(h) * gB` (for dA and dx) in one pass over `h`, `gB`.
//! On CPU these are Rust loops over the buffers, parallel with rayon, that hash the
//! mask bits on the fly; half types compute in float32. On other devices (and on CPU
//! when `tensor_ops` forces it, for tests) the same formulas run as few tensor ops:
//! the mask is built once in forward (14 int32 ops, `Dropout::keep_tensor`) and kept
//! for backward as a bool tensor, 1 byte an element against the 4 bytes and 14 ops
//! per element of building it again; then forward is 2 ops (act, masked scale) and
//! backward 4 (act, two masked scales, act's backward), each fused by torch and run
//! in the input dtype with float32 math inside, as the plain composition's ops are.

use super::activation::Activation;
use super::mask::Dropout;
use crate::error::{dtype_name, same_kind_and_device, CeraError, Result};
use crate::threads;
use half::{bf16, f16};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements per rayon task (a divisor of 2^32, so a chunk never straddles a change of
/// the mask key); below `PARALLEL_MIN` elements a pass runs on the calling thread,
/// which is faster than waking workers that compete with libtorch's spinning ones.
const CHUNK: usize = 16 * 1024;
const PARALLEL_MIN: usize = 1 << 20;
/// Elements processed together, so the loops vectorize.
const LANES: usize = 16;

/// What the elementwise passes need to know about the branch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elementwise {
    pub activation: Activation,
    pub scaling: f64,
    /// `None` in eval mode or when p = 0.
    pub dropout: Option<Dropout>,
    /// Run the tensor-op path on CPU too: how tests check, without a GPU, the path
    /// every other device takes. Not part of the user API.
    pub tensor_ops: bool,
}

impl Elementwise {
    /// The factor applied to kept elements.
    fn kept_scale(&self) -> f64 {
        self.scaling * self.dropout.map_or(1.0, |d| d.keep_scale())
    }

    /// Whether tensors on `device` take the tensor-op path.
    pub fn uses_tensor_ops(&self, device: Device) -> bool {
        self.tensor_ops || device != Device::Cpu
    }
}

/// `scaling * mask * act(h)`, and the keep mask when the tensor-op path built one
/// (backward takes it back instead of building it again).
pub fn forward(h: &Tensor, ew: &Elementwise) -> Result<(Tensor, Option<Tensor>)> {
    if ew.uses_tensor_ops(h.device()) {
        return forward_tensor_ops(h, ew);
    }
    let h = h.f_contiguous()?;
    let out = h.f_empty_like()?;
    match h.f_kind()? {
        Kind::Float => forward_cpu::<f32>(&h, &out, ew)?,
        Kind::Double => forward_cpu::<f64>(&h, &out, ew)?,
        Kind::BFloat16 => forward_cpu::<bf16>(&h, &out, ew)?,
        Kind::Half => forward_cpu::<f16>(&h, &out, ew)?,
        other => return Err(unsupported(other)),
    }
    Ok((out, None))
}

/// `(scaling * mask * act(h), scaling * mask * act'(h) * gb)`. A `keep` mask from
/// forward sends the pass down the tensor-op path, which built it.
pub fn backward(
    h: &Tensor,
    gb: &Tensor,
    ew: &Elementwise,
    keep: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    if h.size() != gb.size() {
        return Err(CeraError::Shape(format!(
            "hidden {:?} and its gradient {:?} differ",
            h.size(),
            gb.size()
        )));
    }
    same_kind_and_device(gb, "the hidden gradient", h, "the hidden state")?;
    if keep.is_some() || ew.uses_tensor_ops(h.device()) {
        return backward_tensor_ops(h, gb, ew, keep);
    }
    let h = h.f_contiguous()?;
    let gb = gb.f_contiguous()?;
    let am = h.f_empty_like()?;
    let dz = h.f_empty_like()?;
    match h.f_kind()? {
        Kind::Float => backward_cpu::<f32>(&h, &gb, &am, &dz, ew)?,
        Kind::Double => backward_cpu::<f64>(&h, &gb, &am, &dz, ew)?,
        Kind::BFloat16 => backward_cpu::<bf16>(&h, &gb, &am, &dz, ew)?,
        Kind::Half => backward_cpu::<f16>(&h, &gb, &am, &dz, ew)?,
        other => return Err(unsupported(other)),
    }
    Ok((am, dz))
}

/// The forward pass as tensor ops: the mask (if any), act, masked scale.
fn forward_tensor_ops(h: &Tensor, ew: &Elementwise) -> Result<(Tensor, Option<Tensor>)> {
    let keep = ew.dropout.map(|d| keep_like(&d, h)).transpose()?;
    let out = masked_scale(&ew.activation.apply_tensor(h)?, keep.as_ref(), ew)?;
    Ok((out, keep))
}

/// The backward pass as tensor ops, with forward's mask, or the mask built again
/// when the caller kept none.
fn backward_tensor_ops(
    h: &Tensor,
    gb: &Tensor,
    ew: &Elementwise,
    keep: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let built;
    let keep = match (ew.dropout, keep) {
        (None, _) => None,
        (Some(_), Some(keep)) => {
            check_keep(keep, h)?;
            Some(keep)
        }
        (Some(d), None) => {
            built = keep_like(&d, h)?;
            Some(&built)
        }
    };
    let am = masked_scale(&ew.activation.apply_tensor(h)?, keep, ew)?;
    let dz = ew
        .activation
        .backward_tensor(&masked_scale(gb, keep, ew)?, h)?;
    Ok((am, dz))
}

/// The keep mask of `d` shaped like `h`.
fn keep_like(d: &Dropout, h: &Tensor) -> Result<Tensor> {
    let keep = d.keep_tensor(h.numel() as i64, h.device())?;
    Ok(keep.f_view(h.size().as_slice())?)
}

/// `t * kept_scale` where kept and 0 where dropped, in one op (torch's dropout
/// backward), or `t * scaling` without dropout (no op at scaling 1).
fn masked_scale(t: &Tensor, keep: Option<&Tensor>, ew: &Elementwise) -> Result<Tensor> {
    Ok(match keep {
        Some(keep) => Tensor::f_native_dropout_backward(t, keep, ew.kept_scale())?,
        None if ew.scaling == 1.0 => t.shallow_clone(),
        None => t.f_mul_scalar(ew.scaling)?,
    })
}

/// Errors unless a mask handed back to backward is a bool tensor shaped and placed
/// like `h`.
fn check_keep(keep: &Tensor, h: &Tensor) -> Result<()> {
    if keep.f_kind()? != Kind::Bool {
        return Err(CeraError::DType(format!(
            "the saved dropout mask is {:?}, expected Bool",
            keep.f_kind()?
        )));
    }
    if keep.device() != h.device() {
        return Err(CeraError::Device(format!(
            "the saved dropout mask is on {:?}, the hidden state on {:?}",
            keep.device(),
            h.device()
        )));
    }
    if keep.size() != h.size() {
        return Err(CeraError::Shape(format!(
            "the saved dropout mask has shape {:?}, the hidden state {:?}",
            keep.size(),
            h.size()
        )));
    }
    Ok(())
}

fn unsupported(kind: Kind) -> CeraError {
    CeraError::DType(format!(
        "unsupported dtype {}: expected torch.float32, torch.float64, torch.bfloat16 or \
         torch.float16",
        dtype_name(kind)
    ))
}

/// A storage type and the float type its elementwise math runs in.
trait Element: Copy + Send + Sync + 'static {
    type Acc: Compute;
    fn load(self) -> Self::Acc;
    fn store(v: Self::Acc) -> Self;
}

/// The arithmetic the passes need, with an `exp` that vectorizes for f32.
trait Compute:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn exp(self) -> Self;
}

impl Compute for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

impl Compute for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    /// exp by range reduction to |r| <= ln2/2 and a degree-7 Taylor polynomial
    /// (truncation error < 1e-8 relative, below f32's precision). Branch-free
    /// (selects only), so the loops calling it vectorize, unlike libm's expf.
    #[inline(always)]
    fn exp(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = self.clamp(-87.3, 88.3);
        // Round to nearest by the 1.5 * 2^23 trick: no libm call, so it vectorizes.
        const ROUNDER: f32 = 12_582_912.0;
        let n = (x * LOG2E + ROUNDER) - ROUNDER;
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        // Outside the clamped range, the limits libm's expf reaches (NaN stays NaN),
        // so non-finite inputs propagate exactly as through torch's own ops.
        if self > 88.3 {
            f32::INFINITY
        } else if self < -87.3 {
            0.0
        } else {
            p * scale
        }
    }
}

macro_rules! element {
    ($t:ty, $acc:ty, $load:expr, $store:expr) => {
        impl Element for $t {
            type Acc = $acc;
            #[inline(always)]
            fn load(self) -> $acc {
                $load(self)
            }
            #[inline(always)]
            fn store(v: $acc) -> Self {
                $store(v)
            }
        }
    };
}

element!(f32, f32, |v| v, |v| v);
element!(f64, f64, |v| v, |v| v);
element!(bf16, f32, bf16::to_f32, bf16::from_f32);
element!(f16, f32, f16::to_f32, f16::from_f32);

/// An activation as a type, so each loop is compiled for one activation and
/// vectorizes (a per-element match on the activation would not).
trait Act {
    /// act(h) and act'(h).
    fn value_and_slope<F: Compute>(h: F) -> (F, F);
}

struct Silu;
struct Relu;
struct Identity;

impl Act for Silu {
    #[inline(always)]
    fn value_and_slope<F: Compute>(h: F) -> (F, F) {
        let sig = F::ONE / (F::ONE + (-h).exp());
        (h * sig, sig * (F::ONE + h * (F::ONE - sig)))
    }
}

impl Act for Relu {
    #[inline(always)]
    fn value_and_slope<F: Compute>(h: F) -> (F, F) {
        if h > F::ZERO {
            (h, F::ONE)
        } else {
            (F::ZERO, F::ZERO)
        }
    }
}

impl Act for Identity {
    #[inline(always)]
    fn value_and_slope<F: Compute>(h: F) -> (F, F) {
        (h, F::ONE)
    }
}

/// Views a contiguous CPU tensor of element type `T` as a slice.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of the dtype `T` stands for, and non-empty.
unsafe fn slice<T>(t: &Tensor) -> &[T] {
    std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel())
}

/// Runs `body(chunk_no)` for each `CHUNK`-sized piece of `n` elements, in parallel
/// when the tensor is large enough to pay for it.
fn for_each_chunk(n: usize, body: impl Fn(usize) + Send + Sync) -> Result<()> {
    let chunks = n.div_ceil(CHUNK);
    if n < PARALLEL_MIN {
        (0..chunks).for_each(body);
        Ok(())
    } else {
        threads::install(|| (0..chunks).into_par_iter().for_each(body))
    }
}

/// The raw address of a buffer, shareable across the pool's threads.
#[derive(Clone, Copy)]
struct Buf<T>(*mut T);
unsafe impl<T> Send for Buf<T> {}
unsafe impl<T> Sync for Buf<T> {}
impl<T> Buf<T> {
    /// The buffer of a contiguous CPU tensor of element type `T`.
    fn of(t: &Tensor) -> Self {
        Buf(t.data_ptr() as *mut T)
    }

    /// # Safety
    /// `start..start + len` must lie in the buffer and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn chunk(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// The dropout draw of one chunk: its key and threshold, hoisted out of the loops.
#[derive(Clone, Copy)]
struct ChunkMask {
    key: u32,
    threshold: u32,
}

impl ChunkMask {
    /// `None` without dropout. `start` is the chunk's first flat index.
    fn of(ew: &Elementwise, start: usize) -> Option<Self> {
        ew.dropout.map(|d| ChunkMask {
            key: d.key((start as u64 >> 32) as u32),
            threshold: d.threshold(),
        })
    }

    /// The factor of `LANES` elements from flat index `start`: `scale` where kept.
    #[inline(always)]
    fn lanes<F: Compute>(mask: Option<Self>, start: usize, scale: F, out: &mut [F; LANES]) {
        match mask {
            None => *out = [scale; LANES],
            Some(m) => {
                for (j, f) in out.iter_mut().enumerate() {
                    let kept = Dropout::keeps((start + j) as u32, m.key, m.threshold);
                    *f = if kept { scale } else { F::ZERO };
                }
            }
        }
    }
}

/// The forward loop over one chunk; `#[inline(always)]` so each caller compiles it
/// for its own target features.
#[inline(always)]
fn forward_chunk<T: Element, A: Act>(h: &[T], out: &mut [T], start: usize, ew: &Elementwise) {
    let (scale, chunk_mask) = (T::Acc::from_f64(ew.kept_scale()), ChunkMask::of(ew, start));
    let mut mask = [T::Acc::ZERO; LANES];
    for (k, (o, hv)) in out.chunks_mut(LANES).zip(h.chunks(LANES)).enumerate() {
        ChunkMask::lanes(chunk_mask, start + k * LANES, scale, &mut mask);
        for ((o, &hv), &m) in o.iter_mut().zip(hv).zip(&mask) {
            *o = T::store(A::value_and_slope(hv.load()).0 * m);
        }
    }
}

#[inline(always)]
fn backward_chunk<T: Element, A: Act>(
    h: &[T],
    gb: &[T],
    am: &mut [T],
    dz: &mut [T],
    start: usize,
    ew: &Elementwise,
) {
    let (scale, chunk_mask) = (T::Acc::from_f64(ew.kept_scale()), ChunkMask::of(ew, start));
    let mut mask = [T::Acc::ZERO; LANES];
    let outputs = am.chunks_mut(LANES).zip(dz.chunks_mut(LANES));
    let inputs = h.chunks(LANES).zip(gb.chunks(LANES));
    for (k, ((am, dz), (h, gb))) in outputs.zip(inputs).enumerate() {
        ChunkMask::lanes(chunk_mask, start + k * LANES, scale, &mut mask);
        for ((((a_out, dz_out), &hv), &g), &m) in am.iter_mut().zip(dz).zip(h).zip(gb).zip(&mask) {
            let (a, slope) = A::value_and_slope(hv.load());
            *a_out = T::store(a * m);
            *dz_out = T::store(g.load() * m * slope);
        }
    }
}

/// Runs `$chunk::<T, A>($args)` with `A` the activation type of `$act`, compiled for
/// AVX2+FMA when the CPU has them (checked at run time) and for the baseline target
/// otherwise, so one wheel runs everywhere and vectorizes where it can.
macro_rules! dispatch {
    ($act:expr, $chunk:ident::<$t:ty>($($args:expr),*)) => {
        match $act {
            Activation::Silu => dispatch!(@simd $chunk::<$t, Silu>($($args),*)),
            Activation::Relu => dispatch!(@simd $chunk::<$t, Relu>($($args),*)),
            Activation::Identity => dispatch!(@simd $chunk::<$t, Identity>($($args),*)),
        }
    };
    (@simd $chunk:ident::<$t:ty, $a:ty>($($args:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn simd(f: impl FnOnce()) {
                f()
            }
            // SAFETY: the CPU has the features `simd` is compiled for.
            return unsafe { simd(#[inline(always)] || $chunk::<$t, $a>($($args),*)) };
        }
        $chunk::<$t, $a>($($args),*)
    }};
}

fn forward_cpu<T: Element>(h: &Tensor, out: &Tensor, ew: &Elementwise) -> Result<()> {
    let n = h.numel();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `h` is a contiguous, non-empty CPU tensor of dtype T (the caller
    // dispatched on its kind); `out` was just allocated like it.
    let (h, out) = (unsafe { slice::<T>(h) }, Buf::<T>::of(out));
    for_each_chunk(n, |c| {
        let start = c * CHUNK;
        let len = CHUNK.min(n - start);
        // SAFETY: chunks are disjoint and inside the buffer.
        let out = unsafe { out.chunk(start, len) };
        let h = &h[start..start + len];
        dispatch!(ew.activation, forward_chunk::<T>(h, out, start, ew))
    })
}

fn backward_cpu<T: Element>(
    h: &Tensor,
    gb: &Tensor,
    am: &Tensor,
    dz: &Tensor,
    ew: &Elementwise,
) -> Result<()> {
    let n = h.numel();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `h` and `gb` are contiguous, non-empty CPU tensors of dtype T with n
    // elements (the caller checked sizes and kinds and dispatched on the kind); `am`
    // and `dz` were just allocated like `h` and are distinct.
    let (h, gb) = unsafe { (slice::<T>(h), slice::<T>(gb)) };
    let (am, dz) = (Buf::<T>::of(am), Buf::<T>::of(dz));
    for_each_chunk(n, |c| {
        let start = c * CHUNK;
        let len = CHUNK.min(n - start);
        // SAFETY: chunks are disjoint and inside both buffers.
        let (am, dz) = unsafe { (am.chunk(start, len), dz.chunk(start, len)) };
        let (h, gb) = (&h[start..start + len], &gb[start..start + len]);
        dispatch!(ew.activation, backward_chunk::<T>(h, gb, am, dz, start, ew))
    })
}

#[cfg(test)]
mod tests {
    use super::Compute;

    #[test]
    fn fast_exp_is_accurate_and_keeps_the_limits() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            worst = worst.max(((Compute::exp(x) as f64) - exact).abs() / exact);
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert!(Compute::exp(f32::NAN).is_nan());
        assert_eq!(Compute::exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(Compute::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(Compute::exp(0.0f32), 1.0);
    }
}
