//! Between Rondo's bytes and numpy: read-only views over an update's (or the global model's)
//! `Bytes`, and the check and copy of the model a rule returns.

use std::ffi::c_void;

use bytes::Bytes;
use numpy::npyffi::{self, NpyTypes, PY_ARRAY_API, npy_intp};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use rayon::prelude::*;
use rondo_core::aggregate::ModelBuffer;
use rondo_core::kernels::all_finite;
use rondo_core::model::{DType, ModelSpec};

/// Owns the bytes that numpy views look at: every view's `base`, so the bytes live exactly as
/// long as some view of them does, and are dropped (a pooled upload buffer going back to its
/// pool) when Python frees the last one.
#[pyclass(frozen, module = "rondo_aggregator", name = "Buffer")]
pub(super) struct Buffer {
    bytes: Bytes,
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.bytes.len()
    }
}

/// The numpy dtype Rondo's `dtype` reaches Python as. BF16 is `ml_dtypes.bfloat16`, numpy
/// having none of its own; without ml_dtypes such a model cannot be handed over.
fn descr<'py>(py: Python<'py>, dtype: DType) -> Result<Bound<'py, PyArrayDescr>, String> {
    match dtype {
        DType::F32 => Ok(numpy::dtype::<f32>(py)),
        DType::F64 => Ok(numpy::dtype::<f64>(py)),
        DType::F16 => PyArrayDescr::new(py, "float16").map_err(|e| e.to_string()),
        DType::BF16 => py
            .import("ml_dtypes")
            .and_then(|m| m.getattr("bfloat16"))
            .and_then(|t| PyArrayDescr::new(py, t))
            .map_err(|e| {
                format!(
                    "the model has BF16 tensors, which reach Python as ml_dtypes.bfloat16 arrays, and ml_dtypes cannot be imported ({}); pip install ml_dtypes into the aggregator's venv",
                    one_line(&e.to_string())
                )
            }),
    }
}

/// `{name: read-only array}` over `bytes`, which hold `spec`'s tensors back to back
/// (little-endian, as the wire has them and numpy reads them on this platform). No copy.
pub(super) fn views<'py>(
    py: Python<'py>,
    spec: &ModelSpec,
    bytes: Bytes,
) -> Result<Bound<'py, PyDict>, String> {
    if bytes.len() != spec.byte_len() {
        return Err(format!(
            "{} bytes for a model of {} bytes",
            bytes.len(),
            spec.byte_len()
        ));
    }
    let base = bytes.as_ptr();
    let owner = Bound::new(py, Buffer { bytes }).map_err(|e| e.to_string())?;
    let dict = PyDict::new(py);
    let mut offset = 0;
    for tensor in &spec.tensors {
        let descr = descr(py, tensor.dtype)?;
        let mut dims: Vec<npy_intp> = tensor.shape.iter().map(|&d| d as npy_intp).collect();
        // SAFETY: `base + offset` starts `tensor.byte_len()` bytes inside the buffer that
        // `owner` keeps alive, and the array takes a reference to `owner` as its base before
        // anyone can see it. Flags 0: not writeable (numpy refuses to make it so, since its
        // base exposes no writable buffer); numpy works out contiguity and alignment itself,
        // so a tensor at an odd offset is fine.
        let array = unsafe {
            let array = PY_ARRAY_API.PyArray_NewFromDescr(
                py,
                npyffi::get_type_object(py, NpyTypes::PyArray_Type),
                descr.into_dtype_ptr(),
                dims.len() as i32,
                dims.as_mut_ptr(),
                std::ptr::null_mut(),
                base.add(offset) as *mut c_void,
                0,
                std::ptr::null_mut(),
            );
            let array = Bound::from_owned_ptr_or_err(py, array).map_err(|e| e.to_string())?;
            let set = PY_ARRAY_API.PyArray_SetBaseObject(
                py,
                array.as_ptr() as *mut npyffi::PyArrayObject,
                owner.clone().into_any().into_ptr(),
            );
            if set < 0 {
                return Err(PyErr::fetch(py).to_string());
            }
            array
        };
        dict.set_item(&tensor.name, array)
            .map_err(|e| e.to_string())?;
        offset += tensor.byte_len();
    }
    Ok(dict)
}

/// Bytes copied and checked at a time: well inside L2.
const COPY_CHUNK: usize = 256 << 10;

/// A pointer into an array that a caller keeps alive, to copy from with the GIL released.
struct Source {
    ptr: *const u8,
    len: usize,
}

// SAFETY: only read while the arrays it points into are referenced by the caller (see
// `model_from_result`), which holds them across the copy.
unsafe impl Send for Source {}

/// Checks what `finish_round` returned against `spec` (exactly its tensor names, each an
/// ndarray of the model's dtype and shape, every value finite) and copies it into the next
/// model's file buffer, after `prefix` bytes of header room.
/// The buffer is built in `spare` when it fits (memory already mapped).
pub(super) fn model_from_result(
    py: Python<'_>,
    result: &Bound<'_, PyAny>,
    spec: &ModelSpec,
    prefix: usize,
    spare: Option<Vec<u64>>,
) -> Result<ModelBuffer, String> {
    let keys = result
        .call_method0("keys")
        .and_then(|k| k.try_iter())
        .map_err(|_| {
            format!(
                "returned {}, not a mapping of tensor names to numpy arrays",
                type_name(result)
            )
        })?;
    for key in keys {
        let key = key.map_err(|e| e.to_string())?;
        let Ok(name) = key.cast::<PyString>() else {
            return Err(format!(
                "returned a key {} that is not a tensor name (a str)",
                repr(&key)
            ));
        };
        let name = name.to_string_lossy();
        if !spec.tensors.iter().any(|t| t.name == name) {
            return Err(format!(
                "returned tensor `{name}`, which is not part of the model"
            ));
        }
    }
    let ascontiguousarray = py
        .import("numpy")
        .and_then(|np| np.getattr("ascontiguousarray"))
        .map_err(|e| e.to_string())?;
    let mut arrays = Vec::with_capacity(spec.tensors.len());
    let mut sources = Vec::with_capacity(spec.tensors.len());
    for tensor in &spec.tensors {
        let value = result
            .get_item(&tensor.name)
            .map_err(|_| format!("returned no tensor `{}`", tensor.name))?;
        let Ok(array) = value.cast::<PyUntypedArray>() else {
            return Err(format!(
                "returned tensor `{}` as {}, not a numpy array",
                tensor.name,
                type_name(&value)
            ));
        };
        let expected = descr(py, tensor.dtype)?;
        if !array.dtype().is_equiv_to(&expected) {
            return Err(format!(
                "returned tensor `{}` with dtype {}, the model's is {} ({})",
                tensor.name,
                array.dtype(),
                expected,
                tensor.dtype
            ));
        }
        if array.shape() != tensor.shape.as_slice() {
            return Err(format!(
                "returned tensor `{}` with shape {:?}, the model's is {:?}",
                tensor.name,
                array.shape(),
                tensor.shape
            ));
        }
        let array = if array.is_c_contiguous() {
            array.clone()
        } else {
            ascontiguousarray
                .call1((array,))
                .and_then(|a| Ok(a.cast_into::<PyUntypedArray>()?))
                .map_err(|e| e.to_string())?
        };
        // SAFETY: a C-contiguous array of `byte_len` bytes (its dtype and shape were checked),
        // kept alive in `arrays` until the copy below is done.
        let ptr = unsafe { (*npyffi::_PyArray_GET_ITEM_DATA(array.as_array_ptr())).data };
        sources.push(Source {
            ptr: ptr as *const u8,
            len: tensor.byte_len(),
        });
        arrays.push(array);
    }
    let spec_tensors: Vec<(String, DType)> = spec
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype))
        .collect();
    let data_len = spec.byte_len();
    // A model-sized copy and scan: no Python needed, so the GIL goes.
    let model = py.detach(move || {
        let mut model = ModelBuffer::reusing(prefix, data_len, spare);
        // Copied and checked chunk by chunk, while each chunk is still in cache (one pass over
        // memory instead of two), on the rayon pool.
        let mut chunks = Vec::new();
        let mut rest = model.data_mut();
        for (t, (source, (_, dtype))) in sources.iter().zip(&spec_tensors).enumerate() {
            let (target, tail) = std::mem::take(&mut rest).split_at_mut(source.len);
            rest = tail;
            if source.len == 0 {
                continue;
            }
            // SAFETY: see `Source`; `source.len` bytes are readable at `source.ptr`.
            let bytes = unsafe { std::slice::from_raw_parts(source.ptr, source.len) };
            let chunk = COPY_CHUNK - COPY_CHUNK % dtype.size_bytes();
            for (to, from) in target.chunks_mut(chunk).zip(bytes.chunks(chunk)) {
                chunks.push((t, *dtype, to, from));
            }
        }
        let finite: Vec<(usize, bool)> = chunks
            .into_par_iter()
            .map(|(t, dtype, to, from)| {
                to.copy_from_slice(from);
                (t, all_finite(dtype, to))
            })
            .collect();
        match finite.iter().find(|(_, finite)| !finite) {
            Some(&(t, _)) => Err(format!(
                "returned a model that is not finite (tensor `{}` has NaN or infinite values); the previous global model stays",
                spec_tensors[t].0
            )),
            None => Ok(model),
        }
    });
    drop(arrays);
    model
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an object".into())
}

fn repr(value: &Bound<'_, PyAny>) -> String {
    let text = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    text.chars().take(80).collect()
}

/// A message on one line (Python's can span several), for logs and round histories.
pub(super) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
