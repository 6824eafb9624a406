//! Between Rondo's bytes and numpy: read-only views over an update's (or the global model's)
//! `Bytes`, writable views over the next model's file buffer ([`NextModel`]), and the check
//! and copy of the model a rule returns.

use std::ffi::c_void;

use bytes::Bytes;
use numpy::npyffi::{self, NpyTypes, PY_ARRAY_API, npy_intp};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use parking_lot::Mutex;
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

/// Owns the next model's file buffer while Python may write into it (`Aggregator.next_model`
/// views it; it is every such view's base). The buffer is taken back only once nothing but the
/// aggregator references this object, i.e. once no view of it is left; until then it stays
/// here and is freed with it.
#[pyclass(frozen, module = "rondo_aggregator", name = "NextModel")]
pub(super) struct NextModel {
    buffer: Mutex<Option<ModelBuffer>>,
    /// The data section's address and length, for views and for telling a returned array
    /// that lies in it.
    data: usize,
    len: usize,
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

/// An array of `dtype` and `shape` over the memory at `data`, with `owner` as its base.
///
/// # Safety
///
/// `data` must point to `dtype.size × shape.product()` bytes that live as long as `owner`
/// does (and, when `writeable`, that nothing else reads or writes while Python may).
unsafe fn array_over<'py>(
    py: Python<'py>,
    dtype: DType,
    shape: &[usize],
    data: *mut u8,
    writeable: bool,
    owner: &Bound<'py, PyAny>,
) -> Result<Bound<'py, PyAny>, String> {
    let descr = descr(py, dtype)?;
    let mut dims: Vec<npy_intp> = shape.iter().map(|&d| d as npy_intp).collect();
    // Flags 0: not writeable (numpy then refuses to make it so, since its base exposes no
    // writable buffer). numpy works out contiguity and alignment itself, so a tensor at an
    // odd offset is fine.
    let flags = if writeable {
        npyffi::NPY_ARRAY_WRITEABLE
    } else {
        0
    };
    // SAFETY: the caller's promise; the array takes a reference to `owner` as its base before
    // anyone can see it.
    unsafe {
        let array = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, NpyTypes::PyArray_Type),
            descr.into_dtype_ptr(),
            dims.len() as i32,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data as *mut c_void,
            flags,
            std::ptr::null_mut(),
        );
        let array = Bound::from_owned_ptr_or_err(py, array).map_err(|e| e.to_string())?;
        let set = PY_ARRAY_API.PyArray_SetBaseObject(
            py,
            array.as_ptr() as *mut npyffi::PyArrayObject,
            owner.clone().into_ptr(),
        );
        if set < 0 {
            return Err(PyErr::fetch(py).to_string());
        }
        Ok(array)
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
    let base = bytes.as_ptr() as *mut u8;
    let owner = Bound::new(py, Buffer { bytes })
        .map_err(|e| e.to_string())?
        .into_any();
    let dict = PyDict::new(py);
    let mut offset = 0;
    for tensor in &spec.tensors {
        // SAFETY: `base + offset` starts `tensor.byte_len()` bytes inside the buffer `owner`
        // keeps alive; read-only.
        let array = unsafe {
            array_over(
                py,
                tensor.dtype,
                &tensor.shape,
                base.add(offset),
                false,
                &owner,
            )?
        };
        dict.set_item(&tensor.name, array)
            .map_err(|e| e.to_string())?;
        offset += tensor.byte_len();
    }
    Ok(dict)
}

/// The next model's file `buffer` (its data section laid out as `spec`), and `{name: writable
/// array}` over it for the rule to write its result into (`Aggregator.next_model`).
pub(super) fn next_model<'py>(
    py: Python<'py>,
    spec: &ModelSpec,
    mut buffer: ModelBuffer,
) -> Result<(Bound<'py, NextModel>, Bound<'py, PyDict>), String> {
    let data = buffer.data_mut();
    let (base, len) = (data.as_mut_ptr(), data.len());
    let owner = Bound::new(
        py,
        NextModel {
            buffer: Mutex::new(Some(buffer)),
            data: base as usize,
            len,
        },
    )
    .map_err(|e| e.to_string())?;
    let dict = PyDict::new(py);
    let mut offset = 0;
    for tensor in &spec.tensors {
        // SAFETY: inside the buffer `owner` holds (moving a `ModelBuffer` does not move its
        // heap memory), which it keeps until no view of it is left; the aggregator reads it
        // only after the rule's call returned.
        let array = unsafe {
            array_over(
                py,
                tensor.dtype,
                &tensor.shape,
                base.add(offset),
                true,
                owner.as_any(),
            )?
        };
        dict.set_item(&tensor.name, array)
            .map_err(|e| e.to_string())?;
        offset += tensor.byte_len();
    }
    Ok((owner, dict))
}

/// Bytes copied and checked at a time: well inside L2.
const COPY_CHUNK: usize = 256 << 10;

/// Where one tensor of the result is, and where it goes (addresses, for the copy with the
/// GIL released).
struct Move {
    tensor: usize,
    dtype: DType,
    from: usize,
    to: usize,
    len: usize,
}

/// Checks what `finish_round` returned against `spec` (exactly its tensor names, each an
/// ndarray of the model's dtype and shape, every value finite) and makes it the next model's
/// file buffer: `next`'s, its tensors copied in unless the rule wrote them there already.
pub(super) fn model_from_result(
    py: Python<'_>,
    result: Bound<'_, PyAny>,
    spec: &ModelSpec,
    next: Bound<'_, NextModel>,
) -> Result<ModelBuffer, String> {
    let keys = result
        .call_method0("keys")
        .and_then(|k| k.try_iter())
        .map_err(|_| {
            format!(
                "returned {}, not a mapping of tensor names to numpy arrays",
                type_name(&result)
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
    let (data, data_len) = (next.get().data, next.get().len);
    let mut arrays = Vec::with_capacity(spec.tensors.len());
    let mut moves = Vec::with_capacity(spec.tensors.len());
    let mut offset = 0;
    for (t, tensor) in spec.tensors.iter().enumerate() {
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
        // SAFETY: reading the data pointer of an array we hold.
        let from = unsafe { (*npyffi::_PyArray_GET_ITEM_DATA(array.as_array_ptr())).data };
        moves.push(Move {
            tensor: t,
            dtype: tensor.dtype,
            from: from as usize,
            to: data + offset,
            len: tensor.byte_len(),
        });
        arrays.push(array);
        offset += tensor.byte_len();
    }
    // A model-sized copy and scan: no Python needed, so the GIL goes (the arrays stay
    // referenced in `arrays` meanwhile, so their memory stays).
    let finite = py.detach(move || place(moves, data, data_len));
    drop(arrays);
    drop(result);
    if let Some(t) = finite {
        return Err(format!(
            "returned a model that is not finite (tensor `{}` has NaN or infinite values); the previous global model stays",
            spec.tensors[t].name
        ));
    }
    let owner = next.get();
    // Only our reference left: no view of the buffer can be written through any more.
    // SAFETY: reading the reference count of an object we hold.
    let alone = unsafe { pyo3::ffi::Py_REFCNT(next.as_ptr()) } == 1;
    let taken = if alone {
        owner.buffer.lock().take()
    } else {
        None
    };
    match taken {
        Some(buffer) => Ok(buffer),
        None => {
            // The rule kept a view of `next_model`: the published model must not change
            // under it, so it gets a copy, and the buffer stays with the views.
            let buffer = owner.buffer.lock();
            let Some(buffer) = buffer.as_ref() else {
                return Err("the next model's buffer is gone".into());
            };
            let mut copy = ModelBuffer::new(buffer.as_ref().len() - data_len, data_len);
            copy.data_mut().copy_from_slice(buffer.data());
            Ok(copy)
        }
    }
}

/// Puts each tensor of the result where it belongs in the data section at `data` and checks
/// that it is finite; the index of the first tensor that is not, if any.
fn place(moves: Vec<Move>, data: usize, data_len: usize) -> Option<usize> {
    let section = data..data + data_len;
    // A tensor returned from elsewhere in the buffer (another tensor's view, say) is read out
    // before any tensor is written, so that no write overwrites a source still to be read.
    let staged: Vec<Option<Vec<u8>>> = moves
        .iter()
        .map(|m| {
            let inside = m.from < section.end && section.start < m.from + m.len;
            (inside && m.from != m.to).then(|| {
                // SAFETY: memory of an array the caller holds (see `model_from_result`).
                unsafe { std::slice::from_raw_parts(m.from as *const u8, m.len) }.to_vec()
            })
        })
        .collect();
    let mut chunks = Vec::new();
    for (m, staged) in moves.iter().zip(&staged) {
        let from = staged.as_ref().map_or(m.from, |s| s.as_ptr() as usize);
        let chunk = COPY_CHUNK - COPY_CHUNK % m.dtype.size_bytes();
        let mut start = 0;
        while start < m.len {
            let len = chunk.min(m.len - start);
            chunks.push((
                m.tensor,
                m.dtype,
                from + start,
                m.to + start,
                len,
                from != m.to,
            ));
            start += len;
        }
    }
    // Copied and checked chunk by chunk, while each chunk is still in cache (one pass over
    // memory instead of two), on the rayon pool.
    let finite: Vec<(usize, bool)> = chunks
        .into_par_iter()
        .map(|(t, dtype, from, to, len, copy)| {
            // SAFETY: each chunk's target is its own part of the data section, and what is
            // copied into it comes from outside the section (or from `staged`).
            let target = unsafe {
                if copy {
                    std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len);
                }
                std::slice::from_raw_parts(to as *const u8, len)
            };
            (t, all_finite(dtype, target))
        })
        .collect();
    drop(staged);
    finite.iter().find(|(_, ok)| !ok).map(|&(t, _)| t)
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
