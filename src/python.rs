//! The `cera_rs._native` extension module: the only Rust that knows Python.
//!
//! Converts torch tensors to and from `tch::Tensor`, releases the GIL while the
//! kernels run, keeps Rust panics from crossing into Python, and maps each
//! `CeraError` variant to one Python exception type: shape and value errors to
//! ValueError, dtype errors to TypeError, device errors to `DeviceError` (a
//! ValueError subclass: a wrong argument, as a shape is, yet told apart from one),
//! resource and libtorch failures to RuntimeError.

use crate::error::CeraError;
use crate::export::{self, Moments, MomentsState};
use crate::kernel::{self, Activation, Dropout, DropoutPosition, Elementwise, Needs, Saved};
use crate::spectral::{self, Gram};
use numpy::PyArray1;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Tensor};

pyo3::create_exception!(
    cera_rs,
    DeviceError,
    PyValueError,
    "Tensors on a device cera_rs cannot use, or on different devices."
);

impl From<CeraError> for PyErr {
    fn from(err: CeraError) -> PyErr {
        let message = err.to_string();
        match err {
            CeraError::Shape(_) | CeraError::Value(_) | CeraError::NonFinite(_) => {
                PyValueError::new_err(message)
            }
            CeraError::Device(_) => DeviceError::new_err(message),
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
            // tch reads shapes with calls that panic on nested tensors: refuse them here.
            Ok(Some(_)) if ob.getattr(intern!(ob.py(), "is_nested"))?.is_truthy()? => Err(
                PyTypeError::new_err("nested tensors are not supported; pass a regular tensor"),
            ),
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

/// `tensor_ops` forces the tensor-op path (other devices') on CPU: for tests only.
fn elementwise(
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
    tensor_ops: bool,
) -> PyResult<Elementwise> {
    let activation: Activation = activation.parse()?;
    let dropout = (dropout != 0.0).then_some(Dropout { p: dropout, seed });
    Ok(Elementwise {
        activation,
        scaling,
        dropout,
        tensor_ops,
    })
}

/// Training forward: returns `(delta, h, keep)`; `h` and `keep` (the tensor-op path's
/// dropout mask, else `None`) are what `backward` needs.
#[pyfunction]
#[pyo3(signature = (
    x, a, b, *, activation, scaling, dropout, seed, dropout_position = "hidden", tensor_ops = false
))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    x: PyTensor,
    a: PyTensor,
    b: PyTensor,
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
    dropout_position: &str,
    tensor_ops: bool,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let ew = elementwise(activation, scaling, dropout, seed, tensor_ops)?;
    let position: DropoutPosition = dropout_position.parse()?;
    let (y, saved) = run(py, move || kernel::forward(&x.0, &a.0, &b.0, &ew, position))?;
    Ok((
        wrap(py, y)?,
        wrap(py, saved.h)?,
        wrap_optional(py, saved.keep)?,
    ))
}

/// Inference forward: the delta alone, no dropout, nothing kept for backward.
#[pyfunction]
#[pyo3(signature = (x, a, b, *, activation, scaling, tensor_ops = false))]
fn delta(
    py: Python<'_>,
    x: PyTensor,
    a: PyTensor,
    b: PyTensor,
    activation: &str,
    scaling: f64,
    tensor_ops: bool,
) -> PyResult<PyObject> {
    let ew = elementwise(activation, scaling, 0.0, 0, tensor_ops)?;
    let y = run(py, move || {
        kernel::forward(&x.0, &a.0, &b.0, &ew, DropoutPosition::Hidden).map(|(y, _)| y)
    })?;
    wrap(py, y)
}

/// Backward: `(dx, dA, dB)`, each `None` unless asked for.
#[pyfunction]
#[pyo3(signature = (
    grad, x, a, b, h, *, activation, scaling, dropout, seed, needs_x, needs_a, needs_b,
    dropout_position = "hidden", keep = None, tensor_ops = false
))]
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
    dropout_position: &str,
    keep: Option<PyTensor>,
    tensor_ops: bool,
) -> PyResult<(PyObject, PyObject, PyObject)> {
    let saved = Saved {
        x: x.0,
        a: a.0,
        b: b.0,
        h: h.0,
        keep: keep.map(|k| k.0),
        elementwise: elementwise(activation, scaling, dropout, seed, tensor_ops)?,
        position: dropout_position.parse()?,
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

/// The fused activation/dropout pass alone, for branches whose two linear maps are not
/// GEMMs (embedding lookups, convolutions): returns `(scaling * mask * act(h), keep)`,
/// `keep` being the tensor-op path's bool dropout mask (else `None`). `h` may have any
/// shape; the mask is drawn over its flat (contiguous) element order.
#[pyfunction]
#[pyo3(signature = (h, *, activation, scaling, dropout, seed, tensor_ops = false))]
fn elementwise_forward(
    py: Python<'_>,
    h: PyTensor,
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
    tensor_ops: bool,
) -> PyResult<(PyObject, PyObject)> {
    let ew = elementwise(activation, scaling, dropout, seed, tensor_ops)?;
    let (out, keep) = run(py, move || {
        let _no_grad = tch::no_grad_guard();
        kernel::elementwise::forward(&h.0, &ew)
    })?;
    Ok((wrap(py, out)?, wrap_optional(py, keep)?))
}

/// The backward of `elementwise_forward`, recomputed from `h` and the seed (or the
/// kept mask): `(scaling * mask * act(h), scaling * mask * act'(h) * gb)`.
#[pyfunction]
#[pyo3(signature = (h, gb, *, activation, scaling, dropout, seed, keep = None, tensor_ops = false))]
#[allow(clippy::too_many_arguments)]
fn elementwise_backward(
    py: Python<'_>,
    h: PyTensor,
    gb: PyTensor,
    activation: &str,
    scaling: f64,
    dropout: f64,
    seed: u64,
    keep: Option<PyTensor>,
    tensor_ops: bool,
) -> PyResult<(PyObject, PyObject)> {
    let ew = elementwise(activation, scaling, dropout, seed, tensor_ops)?;
    let (am, dz) = run(py, move || {
        let _no_grad = tch::no_grad_guard();
        kernel::elementwise::backward(&h.0, &gb.0, &ew, keep.as_ref().map(|k| &k.0))
    })?;
    Ok((wrap(py, am)?, wrap(py, dz)?))
}

/// Singular values (descending, float64) and the rank metrics over them.
#[pyclass(name = "Spectrum", module = "cera_rs._native", frozen)]
struct PySpectrum(spectral::Spectrum);

#[pymethods]
impl PySpectrum {
    #[getter]
    fn singular_values<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.0.values())
    }

    #[getter]
    fn effective_rank(&self) -> f64 {
        self.0.effective_rank()
    }

    #[getter]
    fn stable_rank(&self) -> f64 {
        self.0.stable_rank()
    }

    #[getter]
    fn participation_ratio(&self) -> f64 {
        self.0.participation_ratio()
    }

    fn energy_rank(&self, tau: f64) -> PyResult<usize> {
        Ok(self.0.energy_rank(tau)?)
    }

    fn tail_energy(&self, r: usize) -> f64 {
        self.0.tail_energy(r)
    }

    fn __len__(&self) -> usize {
        self.0.values().len()
    }
}

/// Spectrum of a 2-D matrix.
#[pyfunction]
fn spectrum(py: Python<'_>, matrix: PyTensor) -> PyResult<PySpectrum> {
    run(py, move || spectral::dense::spectrum(&matrix.0)).map(PySpectrum)
}

/// Spectra of `B·A` for each `(B, A)` pair, computed in parallel.
#[pyfunction]
fn lowrank_spectra(py: Python<'_>, pairs: Vec<(PyTensor, PyTensor)>) -> PyResult<Vec<PySpectrum>> {
    let pairs: Vec<(Tensor, Tensor)> = pairs.into_iter().map(|(b, a)| (b.0, a.0)).collect();
    let spectra = run(py, move || {
        spectral::par_map(pairs, |(b, a)| spectral::lowrank::spectrum(&b, &a))
    })?;
    Ok(spectra.into_iter().map(PySpectrum).collect())
}

/// A streaming Gram accumulator. The mutex makes it shareable between Python
/// threads (forward hooks may run on several); calls run without the GIL.
#[pyclass(name = "GramAccumulator", module = "cera_rs._native", frozen)]
struct PyGram(Mutex<Gram>);

fn lock<T>(accumulator: &Mutex<T>) -> crate::Result<MutexGuard<'_, T>> {
    accumulator.lock().map_err(|_| {
        CeraError::Runtime("the accumulator was left unusable by an earlier internal error".into())
    })
}

/// Locks two distinct accumulators in address order, so two threads merging a pair
/// in opposite directions cannot deadlock; returns `(mine, theirs)`.
fn lock_pair<'a, T>(
    mine: &'a Mutex<T>,
    theirs: &'a Mutex<T>,
) -> crate::Result<(MutexGuard<'a, T>, MutexGuard<'a, T>)> {
    if (mine as *const Mutex<T>) < (theirs as *const Mutex<T>) {
        let mine = lock(mine)?;
        Ok((mine, lock(theirs)?))
    } else {
        let theirs = lock(theirs)?;
        Ok((lock(mine)?, theirs))
    }
}

/// `"cpu"`, `"cuda"`, `"cuda:N"` or `"mps"`, as `str(torch.device)` writes them.
fn parse_device(name: &str) -> crate::Result<Device> {
    match name.split_once(':') {
        None if name == "cpu" => Ok(Device::Cpu),
        None if name == "cuda" => Ok(Device::Cuda(0)),
        None if name == "mps" => Ok(Device::Mps),
        Some(("cuda", index)) => index
            .parse()
            .map(Device::Cuda)
            .map_err(|_| CeraError::Device(format!("bad CUDA device index in {name:?}"))),
        _ => Err(CeraError::Device(format!(
            "unsupported device {name:?}: expected cpu, cuda, cuda:N or mps"
        ))),
    }
}

#[pymethods]
impl PyGram {
    #[new]
    #[pyo3(signature = (dim, device = "cpu", center = false))]
    fn new(dim: i64, device: &str, center: bool) -> PyResult<Self> {
        let device = parse_device(device)?;
        let gram = if center {
            Gram::centred(dim, device)?
        } else {
            Gram::new(dim, device)?
        };
        Ok(PyGram(Mutex::new(gram)))
    }

    /// Loads a summed state: a symmetric Gram matrix, its row count and, for a
    /// centred accumulator, the column sums.
    #[staticmethod]
    #[pyo3(signature = (gram, tokens, column_sums = None))]
    fn from_state(
        py: Python<'_>,
        gram: PyTensor,
        tokens: u64,
        column_sums: Option<PyTensor>,
    ) -> PyResult<Self> {
        let gram = run(py, move || {
            let gram = Gram::from_matrix(&gram.0, tokens)?;
            match column_sums {
                Some(sums) => gram.with_column_sums(&sums.0),
                None => Ok(gram),
            }
        })?;
        Ok(PyGram(Mutex::new(gram)))
    }

    #[getter]
    fn center(&self) -> PyResult<bool> {
        Ok(lock(&self.0)?.is_centred())
    }

    #[getter]
    fn dim(&self) -> PyResult<i64> {
        Ok(lock(&self.0)?.dim())
    }

    #[getter]
    fn tokens_seen(&self) -> PyResult<u64> {
        Ok(lock(&self.0)?.tokens())
    }

    fn update(&self, py: Python<'_>, x: PyTensor) -> PyResult<()> {
        run(py, move || lock(&self.0)?.update(&x.0))
    }

    /// Adds `other`'s rows.
    fn merge(&self, py: Python<'_>, other: &Self) -> PyResult<()> {
        if std::ptr::eq(self, other) {
            return Err(PyValueError::new_err(
                "cannot merge an accumulator into itself",
            ));
        }
        run(py, || {
            let (mut mine, theirs) = lock_pair(&self.0, &other.0)?;
            mine.merge(&theirs)
        })
    }

    /// `(gram, tokens, column_sums)`: copies of the full symmetric Gram matrix and
    /// (centred only, else `None`) the column sums, and the row count.
    fn state(&self, py: Python<'_>) -> PyResult<(PyObject, u64, PyObject)> {
        let (gram, tokens, sums) = run(py, || {
            let g = lock(&self.0)?;
            Ok((g.matrix()?, g.tokens(), g.column_sums()?))
        })?;
        Ok((wrap(py, gram)?, tokens, wrap_optional(py, sums)?))
    }

    fn spectrum(&self, py: Python<'_>) -> PyResult<PySpectrum> {
        run(py, || lock(&self.0)?.spectrum()).map(PySpectrum)
    }
}

/// Spectra of many accumulators, computed in parallel.
#[pyfunction]
fn gram_spectra(py: Python<'_>, grams: Vec<Bound<'_, PyGram>>) -> PyResult<Vec<PySpectrum>> {
    let grams: Vec<&Mutex<Gram>> = grams.iter().map(|g| &g.get().0).collect();
    let spectra = run(py, move || {
        spectral::par_map(grams, |g| lock(g)?.spectrum())
    })?;
    Ok(spectra.into_iter().map(PySpectrum).collect())
}

/// Streaming moments of `(x, y)` token pairs for the linear export; thread-safe
/// like `GramAccumulator`.
#[pyclass(name = "RegressionAccumulator", module = "cera_rs._native", frozen)]
struct PyMoments(Mutex<Moments>);

#[pymethods]
impl PyMoments {
    #[new]
    #[pyo3(signature = (d_in, d_out, device = "cpu"))]
    fn new(d_in: i64, d_out: i64, device: &str) -> PyResult<Self> {
        let moments = Moments::new(d_in, d_out, parse_device(device)?)?;
        Ok(PyMoments(Mutex::new(moments)))
    }

    /// Loads a summed state: `(xx, yx, sum_x, sum_y, sum_yy, tokens)` as `state` gives.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn from_state(
        py: Python<'_>,
        xx: PyTensor,
        yx: PyTensor,
        sum_x: PyTensor,
        sum_y: PyTensor,
        sum_yy: PyTensor,
        tokens: u64,
    ) -> PyResult<Self> {
        let state = MomentsState {
            xx: xx.0,
            yx: yx.0,
            sum_x: sum_x.0,
            sum_y: sum_y.0,
            sum_yy: sum_yy.0,
            tokens,
        };
        let moments = run(py, move || Moments::from_state(&state))?;
        Ok(PyMoments(Mutex::new(moments)))
    }

    #[getter]
    fn d_in(&self) -> PyResult<i64> {
        Ok(lock(&self.0)?.d_in())
    }

    #[getter]
    fn d_out(&self) -> PyResult<i64> {
        Ok(lock(&self.0)?.d_out())
    }

    #[getter]
    fn tokens_seen(&self) -> PyResult<u64> {
        Ok(lock(&self.0)?.tokens())
    }

    fn update(&self, py: Python<'_>, x: PyTensor, y: PyTensor) -> PyResult<()> {
        run(py, move || lock(&self.0)?.update(&x.0, &y.0))
    }

    fn merge(&self, py: Python<'_>, other: &Self) -> PyResult<()> {
        if std::ptr::eq(self, other) {
            return Err(PyValueError::new_err(
                "cannot merge an accumulator into itself",
            ));
        }
        run(py, || {
            let (mut mine, theirs) = lock_pair(&self.0, &other.0)?;
            mine.merge(&theirs)
        })
    }

    /// `(xx, yx, sum_x, sum_y, sum_yy, tokens)`: copies, float64, `xx` full.
    #[allow(clippy::type_complexity)]
    fn state(
        &self,
        py: Python<'_>,
    ) -> PyResult<(PyObject, PyObject, PyObject, PyObject, PyObject, u64)> {
        let s = run(py, || lock(&self.0)?.state())?;
        Ok((
            wrap(py, s.xx)?,
            wrap(py, s.yx)?,
            wrap(py, s.sum_x)?,
            wrap(py, s.sum_y)?,
            wrap(py, s.sum_yy)?,
            s.tokens,
        ))
    }
}

/// One layer's solved regression: `W*`, the linearity of every rank, the factors.
/// Behind a mutex because tensors may be shared between threads but not used from
/// two at once.
#[pyclass(name = "RegressionFit", module = "cera_rs._native", frozen)]
struct PyFit(Mutex<export::Fit>);

#[pymethods]
impl PyFit {
    #[getter]
    fn weight(&self, py: Python<'_>) -> PyResult<PyObject> {
        let weight = lock(&self.0)?
            .weight()
            .f_detach_copy()
            .map_err(CeraError::from)?;
        wrap(py, weight)
    }

    #[getter]
    fn linearity<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(PyArray1::from_slice(py, lock(&self.0)?.linearity()))
    }

    #[getter]
    fn mean_square(&self) -> PyResult<f64> {
        Ok(lock(&self.0)?.mean_square())
    }

    #[getter]
    fn tokens(&self) -> PyResult<u64> {
        Ok(lock(&self.0)?.tokens())
    }

    fn fitted_spectrum(&self) -> PyResult<PySpectrum> {
        Ok(PySpectrum(lock(&self.0)?.fitted_spectrum()?))
    }

    /// Every rank's linearity on the tokens `held_out` has seen.
    fn linearity_on<'py>(
        &self,
        py: Python<'py>,
        held_out: &PyMoments,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let curve = run(py, || {
            let (fit, moments) = (lock(&self.0)?, lock(&held_out.0)?);
            fit.linearity_on(&moments)
        })?;
        Ok(PyArray1::from_vec(py, curve))
    }

    /// `(B, A, bias or None)` of the rank-`k` map.
    fn factors(&self, py: Python<'_>, k: usize) -> PyResult<(PyObject, PyObject, PyObject)> {
        let (b, a, bias) = run(py, || lock(&self.0)?.factors(k))?;
        Ok((wrap(py, b)?, wrap(py, a)?, wrap_optional(py, bias)?))
    }
}

/// Solves many accumulators' regressions in parallel.
#[pyfunction]
#[pyo3(signature = (accumulators, *, ridge, bias))]
fn solve_regressions(
    py: Python<'_>,
    accumulators: Vec<Bound<'_, PyMoments>>,
    ridge: f64,
    bias: bool,
) -> PyResult<Vec<PyFit>> {
    let how = export::Solve { ridge, bias };
    let all: Vec<&Mutex<Moments>> = accumulators.iter().map(|m| &m.get().0).collect();
    let fits = run(py, move || spectral::par_map(all, |m| lock(m)?.solve(how)))?;
    Ok(fits.into_iter().map(|f| PyFit(Mutex::new(f))).collect())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TORCH_VERSION", env!("CERA_RS_TORCH_VERSION"))?;
    m.add("DeviceError", m.py().get_type::<DeviceError>())?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(delta, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(elementwise_forward, m)?)?;
    m.add_function(wrap_pyfunction!(elementwise_backward, m)?)?;
    m.add_class::<PySpectrum>()?;
    m.add_class::<PyGram>()?;
    m.add_function(wrap_pyfunction!(spectrum, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_spectra, m)?)?;
    m.add_function(wrap_pyfunction!(gram_spectra, m)?)?;
    m.add_class::<PyMoments>()?;
    m.add_class::<PyFit>()?;
    m.add_function(wrap_pyfunction!(solve_regressions, m)?)?;
    Ok(())
}
