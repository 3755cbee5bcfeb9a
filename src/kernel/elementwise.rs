//! The fused elementwise passes between the branch's GEMMs.
//!
//! Forward: `a = scaling * mask * act(h)` in one pass over `h`.
//! Backward: `am = scaling * mask * act(h)` (for dB) and
//! `dz = scaling * mask * act'(h) * gB` (for dA and dx) in one pass over `h`, `gB`.
//! On CPU these are Rust loops over the buffers, parallel with rayon; on other
//! devices the same formulas run as tensor ops. Half types compute in float32.

use super::activation::Activation;
use super::mask::Dropout;
use crate::error::{CeraError, Result};
use crate::threads;
use half::{bf16, f16};
use num_traits::{Float, Zero};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements per rayon task; below `PARALLEL_MIN` elements a pass runs inline.
const CHUNK: usize = 16 * 1024;
const PARALLEL_MIN: usize = 64 * 1024;

/// What the elementwise passes need to know about the branch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elementwise {
    pub activation: Activation,
    pub scaling: f64,
    /// `None` in eval mode or when p = 0.
    pub dropout: Option<Dropout>,
}

impl Elementwise {
    /// The factor applied to kept elements.
    fn kept_scale(&self) -> f64 {
        self.scaling * self.dropout.map_or(1.0, |d| d.keep_scale())
    }
}

/// `scaling * mask * act(h)`.
pub fn forward(h: &Tensor, ew: &Elementwise) -> Result<Tensor> {
    if h.device() != Device::Cpu {
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
    Ok(out)
}

/// `(scaling * mask * act(h), scaling * mask * act'(h) * gb)`.
pub fn backward(h: &Tensor, gb: &Tensor, ew: &Elementwise) -> Result<(Tensor, Tensor)> {
    if h.size() != gb.size() {
        return Err(CeraError::Shape(format!(
            "hidden {:?} and its gradient {:?} differ",
            h.size(),
            gb.size()
        )));
    }
    // The CPU loops read both buffers as one element type: the dtypes must agree.
    if h.f_kind()? != gb.f_kind()? || h.device() != gb.device() {
        return Err(CeraError::DType(format!(
            "hidden is {:?} on {:?} but its gradient is {:?} on {:?}",
            h.f_kind()?,
            h.device(),
            gb.f_kind()?,
            gb.device()
        )));
    }
    if h.device() != Device::Cpu {
        return backward_tensor_ops(h, gb, ew);
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

/// The forward pass as tensor ops: the path for CUDA and other devices.
pub fn forward_tensor_ops(h: &Tensor, ew: &Elementwise) -> Result<Tensor> {
    let kind = h.f_kind()?;
    let hf = h.f_to_kind(compute_kind(kind))?;
    let a = ew.activation.apply_tensor(&hf)?;
    let scaled = match mask_tensor(h, ew)? {
        Some(m) => a.f_mul(&m)?,
        None => a.f_mul_scalar(ew.scaling)?,
    };
    Ok(scaled.f_to_kind(kind)?)
}

/// The backward pass as tensor ops: the path for CUDA and other devices.
pub fn backward_tensor_ops(h: &Tensor, gb: &Tensor, ew: &Elementwise) -> Result<(Tensor, Tensor)> {
    let kind = h.f_kind()?;
    let hf = h.f_to_kind(compute_kind(kind))?;
    let gbf = gb.f_to_kind(compute_kind(kind))?;
    let a = ew.activation.apply_tensor(&hf)?;
    let slope = ew.activation.slope_tensor(&hf)?.f_mul(&gbf)?;
    let (am, dz) = match mask_tensor(h, ew)? {
        Some(m) => (a.f_mul(&m)?, slope.f_mul(&m)?),
        None => (a.f_mul_scalar(ew.scaling)?, slope.f_mul_scalar(ew.scaling)?),
    };
    Ok((am.f_to_kind(kind)?, dz.f_to_kind(kind)?))
}

/// The scaled keep mask (`kept_scale` or 0) in the compute dtype, if dropout is on.
fn mask_tensor(h: &Tensor, ew: &Elementwise) -> Result<Option<Tensor>> {
    let Some(d) = ew.dropout else { return Ok(None) };
    let keep = d.keep_tensor(h.numel() as i64, h.device())?;
    let m = keep
        .f_reshape(h.size())?
        .f_to_kind(compute_kind(h.f_kind()?))?
        .f_mul_scalar(ew.kept_scale())?;
    Ok(Some(m))
}

fn compute_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        other => other,
    }
}

fn unsupported(kind: Kind) -> CeraError {
    CeraError::DType(format!(
        "unsupported dtype {kind:?}: expected float32, float64, bfloat16 or float16"
    ))
}

/// A storage type and the float type its elementwise math runs in.
trait Element: Copy + Send + Sync + 'static {
    type Acc: Float + Send + Sync;
    fn load(self) -> Self::Acc;
    fn store(v: Self::Acc) -> Self;
    fn acc(v: f64) -> Self::Acc;
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
            #[inline(always)]
            fn acc(v: f64) -> $acc {
                v as $acc
            }
        }
    };
}

element!(f32, f32, |v| v, |v| v);
element!(f64, f64, |v| v, |v| v);
element!(bf16, f32, bf16::to_f32, bf16::from_f32);
element!(f16, f32, f16::to_f32, f16::from_f32);

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

fn forward_cpu<T: Element>(h: &Tensor, out: &Tensor, ew: &Elementwise) -> Result<()> {
    let n = h.numel();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `h` is a contiguous, non-empty CPU tensor of dtype T (the caller
    // dispatched on its kind); `out` was just allocated like it.
    let (h, out) = (unsafe { slice::<T>(h) }, Buf::<T>::of(out));
    let act = ew.activation;
    let scale = T::acc(ew.kept_scale());
    let (dropout, threshold) = (ew.dropout, ew.dropout.map_or(0, |d| d.threshold()));
    for_each_chunk(n, |c| {
        let start = c * CHUNK;
        let len = CHUNK.min(n - start);
        // SAFETY: chunks are disjoint and inside the buffer.
        let out = unsafe { out.chunk(start, len) };
        for (j, (o, &hv)) in out.iter_mut().zip(&h[start..start + len]).enumerate() {
            let keep = dropout.is_none_or(|d| d.keeps((start + j) as u64, threshold));
            let v = if keep {
                act.value_and_slope(hv.load()).0 * scale
            } else {
                T::Acc::zero()
            };
            *o = T::store(v);
        }
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
    // elements (the caller checked sizes and dispatched on the kind); `am` and `dz`
    // were just allocated like `h` and are distinct.
    let (h, gb) = unsafe { (slice::<T>(h), slice::<T>(gb)) };
    let (am, dz) = (Buf::<T>::of(am), Buf::<T>::of(dz));
    let act = ew.activation;
    let scale = T::acc(ew.kept_scale());
    let (dropout, threshold) = (ew.dropout, ew.dropout.map_or(0, |d| d.threshold()));
    for_each_chunk(n, |c| {
        let start = c * CHUNK;
        let len = CHUNK.min(n - start);
        // SAFETY: chunks are disjoint and inside both buffers.
        let (am, dz) = unsafe { (am.chunk(start, len), dz.chunk(start, len)) };
        let inputs = h[start..start + len].iter().zip(&gb[start..start + len]);
        for (j, ((a_out, dz_out), (&hv, &g))) in
            am.iter_mut().zip(dz.iter_mut()).zip(inputs).enumerate()
        {
            let keep = dropout.is_none_or(|d| d.keeps((start + j) as u64, threshold));
            let m = if keep { scale } else { T::Acc::zero() };
            let (a, slope) = act.value_and_slope(hv.load());
            *a_out = T::store(a * m);
            *dz_out = T::store(g.load() * m * slope);
        }
    })
}
