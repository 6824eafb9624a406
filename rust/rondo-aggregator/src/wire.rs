//! Safetensors on the wire: reading an upload as it streams in, and writing the global model.
//!
//! An upload is read chunk by chunk off the socket: the header first (checked against the
//! global model before any tensor byte is read), then the tensor bytes straight into the
//! staging buffer the caller took from the pool (see [`crate::staging`]), sized for the
//! declared bytes. Nothing here touches the running sum; a rejected upload is simply dropped,
//! and its buffer goes back to the pool.

use std::collections::{BTreeMap, HashMap};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use rondo_core::aggregate::ModelBuffer;
use rondo_core::kernels::all_finite;
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::staging::StagingBuffer;

/// Upload metadata key: the FedAvg weight.
pub const N_SAMPLES_KEY: &str = "rondo.n_samples";
/// Upload metadata key: a JSON object of metrics.
pub const METRICS_KEY: &str = "rondo.metrics";
/// Download metadata key: the round that produced the model.
pub const ROUND_KEY: &str = "rondo.round";

/// safetensors' own cap on the header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// An upload that was read whole and validated, ready to be folded into the sum.
#[derive(Debug)]
pub struct StagedUpdate {
    /// Tensors in the order of their bytes in `data`.
    pub spec: ModelSpec,
    pub data: StagingBuffer,
    pub n_samples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// Why an upload was refused; each maps to one API error code.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    ModelMismatch(#[from] rondo_core::model::ModelMismatch),
    #[error("tensor `{0}` holds NaN or infinite values")]
    NonFinite(String),
    #[error("{0}")]
    InvalidMetadata(String),
    #[error("the upload is {size} bytes or more; the limit is {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("the upload ended after {got} of {expected} bytes")]
    Incomplete { got: u64, expected: u64 },
    #[error("no byte of the upload arrived for {} s", .0.as_secs_f64())]
    Stalled(std::time::Duration),
}

/// Why reading the request body failed (rather than what it held).
#[derive(Debug)]
pub enum BodyError {
    /// Nothing arrived for this long.
    Stalled(std::time::Duration),
    /// The connection broke.
    Broken(String),
}

impl UploadError {
    pub fn code(&self) -> &'static str {
        match self {
            UploadError::Malformed(_) => "malformed_safetensors",
            UploadError::ModelMismatch(_) => "model_mismatch",
            UploadError::NonFinite(_) => "non_finite_values",
            UploadError::InvalidMetadata(_) => "invalid_metadata",
            UploadError::TooLarge { .. } => "body_too_large",
            UploadError::Incomplete { .. } => "upload_incomplete",
            UploadError::Stalled(_) => "upload_stalled",
        }
    }
}

fn dtype_from_safetensors(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn dtype_to_safetensors(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Parses a safetensors header (the JSON after the 8-byte length) into the model's tensors in
/// byte order, and the `__metadata__` map.
pub fn parse_header(header: &[u8]) -> Result<(ModelSpec, HashMap<String, String>), UploadError> {
    let metadata: Metadata = serde_json::from_slice(header)
        .map_err(|e| UploadError::Malformed(format!("invalid safetensors header: {e}")))?;
    let mut tensors = Vec::new();
    for name in metadata.offset_keys() {
        let Some(info) = metadata.info(&name) else {
            continue;
        };
        let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
            UploadError::Malformed(format!(
                "tensor `{name}` has dtype {:?}; Rondo aggregates F32, F64, F16 and BF16",
                info.dtype
            ))
        })?;
        tensors.push(TensorSpec {
            name,
            dtype,
            shape: info.shape.clone(),
        });
    }
    if tensors.is_empty() {
        return Err(UploadError::Malformed("the upload holds no tensor".into()));
    }
    Ok((
        ModelSpec { tensors },
        metadata.metadata().clone().unwrap_or_default(),
    ))
}

fn parse_upload_metadata(
    metadata: &HashMap<String, String>,
) -> Result<(u64, BTreeMap<String, f64>), UploadError> {
    let raw = metadata.get(N_SAMPLES_KEY).ok_or_else(|| {
        UploadError::InvalidMetadata(format!("`__metadata__` must carry `{N_SAMPLES_KEY}`"))
    })?;
    let n_samples: u64 = raw.trim().parse().map_err(|_| {
        UploadError::InvalidMetadata(format!(
            "`{N_SAMPLES_KEY}` must be a positive integer, got {raw:?}"
        ))
    })?;
    if n_samples == 0 {
        return Err(UploadError::InvalidMetadata(format!(
            "`{N_SAMPLES_KEY}` must be at least 1"
        )));
    }
    let metrics = match metadata.get(METRICS_KEY) {
        None => BTreeMap::new(),
        Some(raw) => serde_json::from_str(raw).map_err(|e| {
            UploadError::InvalidMetadata(format!(
                "`{METRICS_KEY}` must be a JSON object of numbers: {e}"
            ))
        })?,
    };
    Ok((n_samples, metrics))
}

/// Reads one upload from `body` into `data` (empty; taken for `expected`'s size, or holding the
/// whole budget when `expected` is not known). When `expected` is given, the upload's tensors
/// must match it (checked from the header, before the tensor bytes are read), so they fit the
/// buffer.
pub async fn read_update<S>(
    mut body: S,
    expected: Option<&ModelSpec>,
    max_body_bytes: u64,
    mut data: StagingBuffer,
) -> Result<StagedUpdate, UploadError>
where
    S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
{
    let mut received: u64 = 0;
    let mut head = BytesMut::new();
    let next = |received: u64, expected_total: u64| UploadError::Incomplete {
        got: received,
        expected: expected_total,
    };

    // The 8-byte header length, then the header.
    let mut header_len: Option<u64> = None;
    let (spec, metadata, rest) = loop {
        if header_len.is_none() && head.len() >= 8 {
            let mut len = [0u8; 8];
            len.copy_from_slice(&head[..8]);
            let n = u64::from_le_bytes(len);
            if n > MAX_HEADER_BYTES {
                return Err(UploadError::Malformed(format!(
                    "the safetensors header claims {n} bytes; at most {MAX_HEADER_BYTES} are allowed"
                )));
            }
            if 8 + n > max_body_bytes {
                return Err(UploadError::TooLarge {
                    size: 8 + n,
                    limit: max_body_bytes,
                });
            }
            header_len = Some(n);
        }
        if let Some(n) = header_len {
            let header_end = 8 + n as usize;
            if head.len() >= header_end {
                let (spec, metadata) = parse_header(&head[8..header_end])?;
                break (spec, metadata, head.split_off(header_end).freeze());
            }
        }
        match body.next().await {
            Some(Ok(chunk)) => {
                received += chunk.len() as u64;
                head.extend_from_slice(&chunk);
            }
            Some(Err(BodyError::Stalled(idle))) => return Err(UploadError::Stalled(idle)),
            Some(Err(BodyError::Broken(_))) => {
                return Err(next(received, 8 + header_len.unwrap_or(0)));
            }
            None => {
                return Err(if head.len() < 8 {
                    UploadError::Malformed(
                        "the body is shorter than a safetensors header".to_string(),
                    )
                } else {
                    next(received, 8 + header_len.unwrap_or(0))
                });
            }
        }
    };
    let header_total = 8 + header_len.unwrap_or(0);
    let data_len = spec.byte_len() as u64;
    let total = header_total + data_len;
    if total > max_body_bytes {
        return Err(UploadError::TooLarge {
            size: total,
            limit: max_body_bytes,
        });
    }
    if let Some(expected) = expected {
        expected.check_update(&spec)?;
    }
    let (n_samples, metrics) = parse_upload_metadata(&metadata)?;

    let too_long = || {
        UploadError::Malformed(format!(
            "the body runs past the {total} bytes its safetensors header declares"
        ))
    };
    data.fit(data_len as usize);
    let mut finite = FiniteCheck::new(&spec);
    if rest.len() as u64 > data_len {
        return Err(too_long());
    }
    data.extend_from_slice(&rest);
    finite.advance(&data)?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| match e {
            BodyError::Stalled(idle) => UploadError::Stalled(idle),
            BodyError::Broken(_) => next(received, total),
        })?;
        received += chunk.len() as u64;
        if (data.len() + chunk.len()) as u64 > data_len {
            return Err(too_long());
        }
        data.extend_from_slice(&chunk);
        // Checked while the bytes are still in cache, so that finishing an upload costs no
        // extra pass over it.
        finite.advance(&data)?;
    }
    if (data.len() as u64) < data_len {
        return Err(next(received, total));
    }
    Ok(StagedUpdate {
        spec,
        data,
        n_samples,
        metrics,
    })
}

/// Checks for NaN/Inf as an upload's bytes arrive: each call checks the whole elements
/// received since the last one.
struct FiniteCheck<'a> {
    spec: &'a ModelSpec,
    /// Index of the tensor being received and where its bytes start.
    tensor: usize,
    tensor_start: usize,
    checked: usize,
}

impl<'a> FiniteCheck<'a> {
    fn new(spec: &'a ModelSpec) -> Self {
        Self {
            spec,
            tensor: 0,
            tensor_start: 0,
            checked: 0,
        }
    }

    fn advance(&mut self, data: &[u8]) -> Result<(), UploadError> {
        while let Some(tensor) = self.spec.tensors.get(self.tensor) {
            let size = tensor.dtype.size_bytes();
            let end = self.tensor_start + tensor.byte_len();
            let available = data.len().min(end);
            let whole = self.tensor_start + (available - self.tensor_start) / size * size;
            if whole > self.checked {
                if !all_finite(tensor.dtype, &data[self.checked..whole]) {
                    return Err(UploadError::NonFinite(tensor.name.clone()));
                }
                self.checked = whole;
            }
            if whole < end {
                return Ok(());
            }
            self.tensor += 1;
            self.tensor_start = end;
        }
        Ok(())
    }
}

/// The start of a safetensors file for `spec` (tensors back to back in spec order) with
/// `round` in its metadata: the 8-byte header length and the header, padded to a multiple of 8
/// so that the tensor data that follows stays aligned.
pub fn model_header(spec: &ModelSpec, round: u32) -> Vec<u8> {
    let mut offset = 0;
    let tensors = spec
        .tensors
        .iter()
        .map(|t| {
            let info = TensorInfo {
                dtype: dtype_to_safetensors(t.dtype),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.byte_len()),
            };
            offset += t.byte_len();
            (t.name.clone(), info)
        })
        .collect();
    let metadata = Metadata::new(
        Some(HashMap::from([(ROUND_KEY.to_string(), round.to_string())])),
        tensors,
    )
    .expect("offsets laid out back to back from a valid spec");
    let mut header = serde_json::to_vec(&metadata).expect("metadata serializes");
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out
}

/// A whole safetensors file: `header` (from [`model_header`]) followed by `data`.
pub fn model_file(header: &[u8], data: &[u8]) -> Bytes {
    let mut file = Vec::with_capacity(header.len() + data.len());
    file.extend_from_slice(header);
    file.extend_from_slice(data);
    Bytes::from(file)
}

/// Reads a safetensors file (the configured initial model) into the global model file Rondo
/// serves: its own header, then the tensor bytes read straight into place (one copy of the
/// model in memory, one pass over it). The file is a `ModelBuffer`, like every later model, so
/// that its memory can become a round's sum once it is replaced.
pub fn load_model_file(
    mut reader: impl std::io::Read,
) -> Result<(ModelSpec, ModelBuffer), UploadError> {
    let io = |e: std::io::Error| UploadError::Malformed(format!("reading the file failed: {e}"));
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(UploadError::Malformed(format!(
            "the safetensors header claims {header_len} bytes; at most {MAX_HEADER_BYTES} are allowed"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(io)?;
    let (spec, _) = parse_header(&header)?;
    let ours = model_header(&spec, 0);
    let data_len = spec.byte_len();
    let mut file = ModelBuffer::new(ours.len(), data_len);
    file.prefix_mut().copy_from_slice(&ours);
    let data = file.data_mut();
    let mut got = 0;
    while got < data_len {
        match reader.read(&mut data[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    if got < data_len || reader.read(&mut [0u8]).map_err(io)? > 0 {
        let holds = if got < data_len {
            format!("{got} bytes")
        } else {
            "more bytes".to_string()
        };
        return Err(UploadError::Malformed(format!(
            "the file holds {holds} of tensor data; its header declares {data_len}"
        )));
    }
    FiniteCheck::new(&spec).advance(file.data())?;
    Ok((spec, file))
}

/// Reads a whole safetensors file held in memory into its tensors and their bytes.
#[cfg(test)]
pub(crate) fn read_model_file(bytes: &[u8]) -> Result<(ModelSpec, Vec<u8>), UploadError> {
    let (spec, file) = load_model_file(bytes)?;
    Ok((spec, file.data().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rondo_core::kernels::encode_values;

    async fn read_update<S>(
        body: S,
        expected: Option<&ModelSpec>,
        max_body_bytes: u64,
    ) -> Result<StagedUpdate, UploadError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        super::read_update(
            body,
            expected,
            max_body_bytes,
            StagingBuffer::unpooled(Vec::new()),
        )
        .await
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            tensors: vec![
                TensorSpec {
                    name: "a".into(),
                    dtype: DType::F32,
                    shape: vec![2],
                },
                TensorSpec {
                    name: "b".into(),
                    dtype: DType::F32,
                    shape: vec![1, 3],
                },
            ],
        }
    }

    fn upload(values: &[f64], n_samples: &str) -> Vec<u8> {
        let header = model_header(&spec(), 0);
        let data = encode_values(DType::F32, values);
        // Swap in upload metadata by re-serializing the header.
        let header = std::str::from_utf8(&header[8..]).unwrap();
        let header = header.replace(
            &format!("\"{ROUND_KEY}\":\"0\""),
            &format!("\"{N_SAMPLES_KEY}\":\"{n_samples}\""),
        );
        let mut header = header.trim_end().as_bytes().to_vec();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&data);
        out
    }

    fn chunks(bytes: &[u8], size: usize) -> impl Stream<Item = Result<Bytes, BodyError>> + Unpin {
        let parts: Vec<Result<Bytes, BodyError>> = bytes
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn reads_an_upload_in_any_chunking() {
        let bytes = upload(&[1.0, 2.0, 3.0, 4.0, 5.0], "7");
        for size in [1, 3, 8, 13, 1000] {
            let staged = read_update(chunks(&bytes, size), Some(&spec()), 1 << 20)
                .await
                .unwrap();
            assert_eq!(staged.n_samples, 7);
            assert_eq!(
                &staged.data[..],
                encode_values(DType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0])
            );
        }
    }

    #[tokio::test]
    async fn refuses_bad_uploads_with_the_right_code() {
        let good = upload(&[1.0; 5], "7");
        let code = |r: Result<StagedUpdate, UploadError>| r.unwrap_err().code();
        assert_eq!(
            code(read_update(chunks(&good[..good.len() - 1], 4), None, 1 << 20).await),
            "upload_incomplete"
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            code(read_update(chunks(&long, 4), None, 1 << 20).await),
            "malformed_safetensors"
        );
        assert_eq!(
            code(read_update(chunks(&good, 4), None, 20).await),
            "body_too_large"
        );
        assert_eq!(
            code(read_update(chunks(b"garbage!garbage!", 4), None, 1 << 20).await),
            "malformed_safetensors"
        );
        assert_eq!(
            code(read_update(chunks(&upload(&[1.0; 5], "0"), 4), None, 1 << 20).await),
            "invalid_metadata"
        );
        assert_eq!(
            code(read_update(chunks(&upload(&[f64::NAN; 5], "1"), 4), None, 1 << 20).await),
            "non_finite_values"
        );
        let mut other = spec();
        other.tensors[1].shape = vec![3];
        assert_eq!(
            code(read_update(chunks(&good, 4), Some(&other), 1 << 20).await),
            "model_mismatch"
        );
        let stalled = futures::stream::iter(vec![
            Ok(Bytes::copy_from_slice(&good[..20])),
            Err(BodyError::Stalled(std::time::Duration::from_secs(1))),
        ]);
        assert_eq!(
            code(read_update(stalled, None, 1 << 20).await),
            "upload_stalled"
        );
    }

    #[tokio::test]
    async fn uploads_are_staged_in_pooled_buffers_and_rejected_ones_give_theirs_back() {
        let gauge = prometheus::IntGauge::new("idle", "idle bytes").expect("valid metric");
        let pool = crate::staging::StagingPool::new(1 << 20, true, gauge);
        let size = Some(spec().byte_len());
        let buffer = pool.take(size).await;
        let ptr = buffer.as_ptr();
        let bad = upload(&[f64::INFINITY; 5], "1");
        let err = super::read_update(chunks(&bad, 4), Some(&spec()), 1 << 20, buffer).await;
        assert_eq!(err.unwrap_err().code(), "non_finite_values");
        assert_eq!(pool.idle_bytes(), spec().byte_len() as u64);

        let good = upload(&[1.0, 2.0, 3.0, 4.0, 5.0], "2");
        let buffer = pool.take(size).await;
        let staged = super::read_update(chunks(&good, 4), Some(&spec()), 1 << 20, buffer)
            .await
            .unwrap();
        assert_eq!(staged.data.as_ptr(), ptr, "the same buffer, reused");
        assert_eq!(
            &staged.data[..],
            encode_values(DType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0])
        );
    }

    #[test]
    fn model_file_round_trips_through_safetensors() {
        let data = encode_values(DType::F32, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        let file = model_file(&model_header(&spec(), 3), &data);
        assert_eq!(model_header(&spec(), 3).len() % 8, 0);
        let parsed = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(parsed.tensor("b").unwrap().shape(), &[1, 3]);
        let (spec2, data2) = read_model_file(&file).unwrap();
        let (spec3, loaded) = load_model_file(&file[..]).unwrap();
        assert_eq!(spec3, spec());
        assert_eq!(loaded.data(), &data[..]);
        assert_eq!(
            &loaded.as_ref()[..model_header(&spec(), 0).len()],
            &model_header(&spec(), 0)[..]
        );
        assert!(load_model_file(&file[..file.len() - 1]).is_err());
        let mut longer = file.to_vec();
        longer.push(0);
        assert!(load_model_file(&longer[..]).is_err());
        assert_eq!(spec2, spec());
        assert_eq!(data2, data);
    }
}
