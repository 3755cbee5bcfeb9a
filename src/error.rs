//! One error type for the crate, and the torch names its messages use. The PyO3
//! layer maps each variant to a Python exception exactly once (see `python.rs`);
//! kernels never panic on bad input.

use tch::{Device, Kind, Tensor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CeraError {
    /// Shapes that do not fit together (wrong last dimension, rank mismatch, ...).
    #[error("shape error: {0}")]
    Shape(String),
    /// A dtype the kernel does not support, or dtypes that differ between inputs.
    #[error("dtype error: {0}")]
    DType(String),
    /// A device the kernel cannot use, or inputs on different devices.
    #[error("device error: {0}")]
    Device(String),
    /// A scalar argument out of its domain (dropout probability, activation name, ...).
    #[error("invalid value: {0}")]
    Value(String),
    /// NaN or infinity where a finite matrix is needed (spectra, Gram matrices).
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// A resource the kernel could not get (threads, memory).
    #[error("runtime error: {0}")]
    Runtime(String),
    /// An error reported by libtorch itself.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, CeraError>;

/// A dtype as torch prints it (`torch.float32`), never tch's name (`Float`).
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "torch.uint8",
        Kind::Int8 => "torch.int8",
        Kind::Int16 => "torch.int16",
        Kind::Int => "torch.int32",
        Kind::Int64 => "torch.int64",
        Kind::Half => "torch.float16",
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::ComplexHalf => "torch.complex32",
        Kind::ComplexFloat => "torch.complex64",
        Kind::ComplexDouble => "torch.complex128",
        Kind::Bool => "torch.bool",
        Kind::QInt8 => "torch.qint8",
        Kind::QUInt8 => "torch.quint8",
        Kind::QInt32 => "torch.qint32",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Float8e5m2 => "torch.float8_e5m2",
        Kind::Float8e4m3fn => "torch.float8_e4m3fn",
        Kind::Float8e5m2fnuz => "torch.float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "torch.float8_e4m3fnuz",
    }
}

/// The dtype of `t` as torch prints it; tch cannot name some (uint16, ...), and
/// those are reported as such rather than as an error of their own.
pub fn tensor_dtype_name(t: &Tensor) -> &'static str {
    t.f_kind()
        .map_or("a dtype cera_rs does not know", dtype_name)
}

/// The device of `t` as `str(tensor.device)` writes it (`cpu`, `cuda:0`, `meta`).
///
/// tch reports every device other than CPU, CUDA and Vulkan as `Mps`, meta included;
/// a meta tensor is told apart by having no storage (an empty sum on it is still
/// without data), and a build without MPS cannot hold MPS tensors.
pub fn device_name(t: &Tensor) -> String {
    match t.device() {
        Device::Cpu => "cpu".into(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Vulkan => "vulkan".into(),
        Device::Mps if is_meta(t) => "meta".into(),
        Device::Mps if tch::utils::has_mps() => "mps".into(),
        Device::Mps => "a device other than cpu, cuda or meta".into(),
    }
}

/// Whether `t` and `u` are on one device; tch's `Device` alone calls meta and MPS equal.
pub fn same_device(t: &Tensor, u: &Tensor) -> bool {
    let device = t.device();
    device == u.device() && (device != Device::Mps || is_meta(t) == is_meta(u))
}

/// Errors unless `t` has the dtype and device of `like`; the CPU loops read buffers of
/// one element type, so a mismatch must never reach them.
pub fn same_kind_and_device(t: &Tensor, what: &str, like: &Tensor, like_what: &str) -> Result<()> {
    if !same_device(t, like) {
        return Err(CeraError::Device(format!(
            "{what} is on {}, {like_what} on {}",
            device_name(t),
            device_name(like)
        )));
    }
    if t.f_kind()? != like.f_kind()? {
        return Err(CeraError::DType(format!(
            "{what} is {}, {like_what} {}",
            tensor_dtype_name(t),
            tensor_dtype_name(like)
        )));
    }
    Ok(())
}

fn is_meta(t: &Tensor) -> bool {
    // A zero-element slice keeps the device and costs nothing to reduce.
    let probe = t
        .f_flatten(0, -1)
        .and_then(|flat| flat.f_narrow(0, 0, 0))
        .and_then(|empty| empty.f_to_kind(Kind::Float))
        .and_then(|empty| empty.f_sum(Kind::Float));
    probe.is_ok_and(|s| s.data_ptr().is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_torch_names() {
        let t = Tensor::zeros([2, 3], (Kind::BFloat16, Device::Cpu));
        assert_eq!(tensor_dtype_name(&t), "torch.bfloat16");
        assert_eq!(device_name(&t), "cpu");
        assert_eq!(dtype_name(Kind::Float), "torch.float32");
        assert_eq!(dtype_name(Kind::Int64), "torch.int64");
    }
}
