//! The `cera_rs._native` extension module: the only Rust that knows Python.
//!
//! Converts torch tensors to and from `tch::Tensor`, releases the GIL while the
//! kernels run, keeps Rust panics from crossing into Python, and maps each
//! `CeraError` variant to one Python exception type.

use crate::error::CeraError;
use crate::kernel::{self, Activation, Dropout, Elementwise, Needs, Saved};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Tensor;

impl From<CeraError> for PyErr {
    fn from(err: CeraError) -> PyErr {
        let message = err.to_string();
        match err {
            CeraError::Shape(_) | CeraError::Value(_) | CeraError::Device(_) => {
                PyValueError::new_err(message)
            }
            CeraError::DType(_) => PyTypeError::new_err(message),
            CeraError::Runtime(_) | CeraError::Torch(_) => PyRuntimeError::new_err(message),
        }
    }
}

/// A torch.Tensor argument.
struct PyTensor(Tensor);

impl<'py> FromPyObject<'py> for PyTensor {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let ptr = ob.as_ptr() as *mut tch::python::CPyObject;
        // SAFETY: `ptr` is a live Python object, borrowed for this call.
        match unsafe { Tensor::pyobject_unpack(ptr) } {
            Ok(Some(tensor)) => Ok(PyTensor(tensor)),
            Ok(None) => Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {}",
                ob.get_type().name()?
            ))),
            Err(e) => Err(CeraError::from(e).into()),
        }
    }
}

fn wrap(py: Python<'_>, tensor: Tensor) -> PyResult<PyObject> {
    let ptr = tensor.pyobject_wrap().map_err(CeraError::from)?;
    // SAFETY: `pyobject_wrap` returns a new reference (or null with an error set).
    unsafe { PyObject::from_owned_ptr_or_err(py, ptr as *mut pyo3::ffi::PyObject) }
}

fn wrap_optional(py: Python<'_>, tensor: Option<Tensor>) -> PyResult<PyObject> {
    match tensor {
        Some(t) => wrap(py, t),
        None => Ok(py.None()),
    }
}

/// Runs Rust work without the GIL; a panic becomes a RuntimeError.
fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    py.allow_threads(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            PyRuntimeError::new_err(format!("cera_rs internal error: {what}"))
        })?
        .map_err(PyErr::from)
}

fn elementwise(activation: &str, scaling: f64, dropout: f64, seed: u64) -> PyResult<Elementwise> {
    let activation: Activation = activation.parse()?;
    let dropout = (dropout != 0.0).then_some(Dropout { p: dropout, seed });
    Ok(Elementwise {
        activation,
        scaling,
        dropout,
    })
}

/// Training forward: returns `(delta, h)`; `h` is what `backward` needs.
#[pyfunction]
#[pyo3(signature = (x, a, b, *, activation, scaling, dropout, seed))]
fn forward(
    py: Python<'_>,
    x: PyTensor,
    a: PyTensor,
    b: PyTensor,
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
) -> PyResult<(PyObject, PyObject)> {
    let ew = elementwise(activation, scaling, dropout, seed)?;
    let (y, saved) = run(py, move || kernel::forward(&x.0, &a.0, &b.0, &ew))?;
    Ok((wrap(py, y)?, wrap(py, saved.h)?))
}

/// Inference forward: the delta alone, no dropout, nothing kept for backward.
#[pyfunction]
#[pyo3(signature = (x, a, b, *, activation, scaling))]
fn delta(
    py: Python<'_>,
    x: PyTensor,
    a: PyTensor,
    b: PyTensor,
    activation: &str,
    scaling: f64,
) -> PyResult<PyObject> {
    let ew = elementwise(activation, scaling, 0.0, 0)?;
    let y = run(py, move || {
        kernel::forward(&x.0, &a.0, &b.0, &ew).map(|(y, _)| y)
    })?;
    wrap(py, y)
}

/// Backward: `(dx, dA, dB)`, each `None` unless asked for.
#[pyfunction]
#[pyo3(signature = (grad, x, a, b, h, *, activation, scaling, dropout, seed, needs_x, needs_a, needs_b))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    a: PyTensor,
    b: PyTensor,
    h: PyTensor,
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
    needs_x: bool,
    needs_a: bool,
    needs_b: bool,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let saved = Saved {
        x: x.0,
        a: a.0,
        b: b.0,
        h: h.0,
        elementwise: elementwise(activation, scaling, dropout, seed)?,
    };
    let needs = Needs {
        x: needs_x,
        a: needs_a,
        b: needs_b,
    };
    let grads = run(py, move || kernel::backward(&grad.0, &saved, needs))?;
    Ok((
        wrap_optional(py, grads.x)?,
        wrap_optional(py, grads.a)?,
        wrap_optional(py, grads.b)?,
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TORCH_VERSION", env!("CERA_RS_TORCH_VERSION"))?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(delta, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    Ok(())
}
