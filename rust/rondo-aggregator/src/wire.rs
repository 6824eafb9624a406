//! Safetensors on the wire: reading an upload as it streams in, and writing the global model.
//!
//! An upload is read chunk by chunk off the socket: the header first (checked against the
//! global model before any tensor byte is read), then the tensor bytes straight into the
//! staging buffer the caller took from the pool (see [`crate::staging`]), sized for the
//! declared bytes. Nothing here touches the running sum; a rejected upload is simply dropped,
//! and its buffer goes back to the pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use rondo_core::aggregate::ModelBuffer;
use rondo_core::kernels::all_finite;
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::staging::StagingBuffer;

/// Upload metadata key: the FedAvg weight.
pub const N_SAMPLES_KEY: &str = "rondo.n_samples";
/// Upload metadata key: a JSON object of metrics.
pub const METRICS_KEY: &str = "rondo.metrics";
/// Download metadata key: the round that produced the model.
pub const ROUND_KEY: &str = "rondo.round";

/// safetensors' own cap on the header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bounds on what an upload's metadata may carry (`[limits]` of the aggregator's config; see
/// `configs/dev-aggregator.toml` for why each default is what it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadLimits {
    /// Largest `rondo.n_samples` accepted.
    pub max_n_samples: u64,
    /// Most keys `rondo.metrics` may hold.
    pub max_metrics: usize,
    /// Longest metric name, in UTF-8 bytes.
    pub max_metric_key_bytes: usize,
    /// Longest `rondo.metrics` value (its raw JSON text), in bytes.
    pub max_metrics_bytes: usize,
}

/// Every total weight stays an exact integer in the `f64` the accumulator keeps it in.
const MAX_N_SAMPLES_BOUND: u64 = 1 << 53;
/// Metrics travel to the coordinator with every accepted update and stay in its round history:
/// even a configured limit keeps them small.
const MAX_METRICS_BYTES_BOUND: usize = 1 << 20;

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_n_samples: 1_000_000_000,
            max_metrics: 64,
            max_metric_key_bytes: 128,
            max_metrics_bytes: 16 * 1024,
        }
    }
}

impl UploadLimits {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_N_SAMPLES_BOUND).contains(&self.max_n_samples) {
            return Err(format!(
                "limits.max_n_samples must be between 1 and 2^53, got {}",
                self.max_n_samples
            ));
        }
        if self.max_metrics_bytes > MAX_METRICS_BYTES_BOUND {
            return Err(format!(
                "limits.max_metrics_bytes must be at most {MAX_METRICS_BYTES_BOUND}, got {}",
                self.max_metrics_bytes
            ));
        }
        Ok(())
    }
}

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
    #[error("{0}")]
    InvalidMetrics(String),
    #[error("the upload is {size} bytes or more; the limit is {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("the upload ended after {got} of {expected} bytes")]
    Incomplete { got: u64, expected: u64 },
    #[error("no byte of the upload arrived for {} s", .0.as_secs_f64())]
    Stalled(std::time::Duration),
    #[error("{0}")]
    TooSlow(UploadTooSlow),
}

/// An upload that came in slower than `api.min_upload_bytes_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadTooSlow {
    pub received: u64,
    pub secs: f64,
    pub min_bytes_per_sec: u64,
}

impl std::fmt::Display for UploadTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upload arrived at {:.0} bytes/s on average ({} bytes in {:.1} s); the minimum \
             is {} bytes/s (api.min_upload_bytes_per_sec)",
            self.received as f64 / self.secs.max(f64::MIN_POSITIVE),
            self.received,
            self.secs,
            self.min_bytes_per_sec
        )
    }
}

/// Why reading the request body failed (rather than what it held).
#[derive(Debug)]
pub enum BodyError {
    /// Nothing arrived for this long.
    Stalled(std::time::Duration),
    /// The connection broke.
    Broken(String),
    /// The bytes came too slowly.
    TooSlow(UploadTooSlow),
}

impl UploadError {
    pub fn code(&self) -> &'static str {
        match self {
            UploadError::Malformed(_) => "malformed_safetensors",
            UploadError::ModelMismatch(_) => "model_mismatch",
            UploadError::NonFinite(_) => "non_finite_values",
            UploadError::InvalidMetadata(_) => "invalid_metadata",
            UploadError::InvalidMetrics(_) => "invalid_metrics",
            UploadError::TooLarge { .. } => "body_too_large",
            UploadError::Incomplete { .. } => "upload_incomplete",
            UploadError::Stalled(_) => "upload_stalled",
            UploadError::TooSlow(_) => "upload_too_slow",
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

/// At most this much of a key is quoted in an error message.
const SHOWN_KEY_CHARS: usize = 64;

fn shown(key: &str) -> String {
    let mut shown: String = key.chars().take(SHOWN_KEY_CHARS).collect();
    if shown.len() < key.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// The entries of a JSON object, in order, refusing a key that appears twice: serde_json (and
/// so safetensors) would keep the last one, letting one header say two things to two readers.
struct UniqueEntries<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueEntries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = UniqueEntries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!(
                            "key {} appears more than once",
                            shown(&key)
                        )));
                    }
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(UniqueEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries(PhantomData))
    }
}

/// A safetensors header as written: `__metadata__` and the tensors, each key once.
struct Header {
    metadata: Option<HashMap<String, String>>,
    tensors: Vec<(String, TensorInfo)>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = Header;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensors and `__metadata__`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
                let mut seen = HashSet::new();
                let mut header = Header {
                    metadata: None,
                    tensors: Vec::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!(
                            "key {} appears more than once",
                            shown(&key)
                        )));
                    }
                    if key == "__metadata__" {
                        let UniqueEntries(entries) = map.next_value()?;
                        header.metadata = Some(entries.into_iter().collect());
                    } else {
                        header.tensors.push((key, map.next_value()?));
                    }
                }
                Ok(header)
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// Parses a safetensors header (the JSON after the 8-byte length) into the model's tensors in
/// byte order, and the `__metadata__` map.
pub fn parse_header(header: &[u8]) -> Result<(ModelSpec, HashMap<String, String>), UploadError> {
    let invalid =
        |e: &dyn fmt::Display| UploadError::Malformed(format!("invalid safetensors header: {e}"));
    let Header {
        metadata,
        mut tensors,
    } = serde_json::from_slice(header).map_err(|e| invalid(&e))?;
    // safetensors' own order, which `Metadata::new` checks the offsets in.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let metadata = Metadata::new(metadata, tensors).map_err(|e| invalid(&e))?;
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

/// `0` or a digit 1-9 followed by digits: the one spelling of a number, so that every reader
/// of the same bytes (and every log line) sees the same value.
pub fn is_canonical_decimal(raw: &str) -> bool {
    match raw.as_bytes() {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

fn parse_n_samples(raw: &str, limits: &UploadLimits) -> Result<u64, UploadError> {
    let max = limits.max_n_samples;
    let invalid = || {
        UploadError::InvalidMetadata(format!(
            "`{N_SAMPLES_KEY}` must be a decimal integer from 1 to {max} (limits.max_n_samples) \
             without sign, spaces or leading zeros, got {}",
            shown(raw)
        ))
    };
    if !is_canonical_decimal(raw) {
        return Err(invalid());
    }
    match raw.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(invalid()),
    }
}

fn parse_metrics(raw: &str, limits: &UploadLimits) -> Result<BTreeMap<String, f64>, UploadError> {
    let invalid = |why: String| UploadError::InvalidMetrics(format!("`{METRICS_KEY}` {why}"));
    // Before parsing, so that an oversized value costs no more than its length.
    if raw.len() > limits.max_metrics_bytes {
        return Err(invalid(format!(
            "is {} bytes; at most {} are allowed (limits.max_metrics_bytes)",
            raw.len(),
            limits.max_metrics_bytes
        )));
    }
    let UniqueEntries(entries) = serde_json::from_str::<UniqueEntries<f64>>(raw)
        .map_err(|e| invalid(format!("must be a JSON object of finite numbers: {e}")))?;
    if entries.len() > limits.max_metrics {
        return Err(invalid(format!(
            "holds {} metrics; at most {} are allowed (limits.max_metrics)",
            entries.len(),
            limits.max_metrics
        )));
    }
    for (key, value) in &entries {
        if key.is_empty() || key.len() > limits.max_metric_key_bytes {
            return Err(invalid(format!(
                "has the name {} of {} bytes; names must be 1 to {} bytes \
                 (limits.max_metric_key_bytes)",
                shown(key),
                key.len(),
                limits.max_metric_key_bytes
            )));
        }
        if !value.is_finite() {
            return Err(invalid(format!("metric {} is not finite", shown(key))));
        }
    }
    Ok(entries.into_iter().collect())
}

/// An upload's `__metadata__` read into its sample count and metrics, within `limits`: what
/// [`read_update`] checks once the header is in (public for the fuzz target `json_bodies`).
pub fn parse_upload_metadata(
    metadata: &HashMap<String, String>,
    limits: &UploadLimits,
) -> Result<(u64, BTreeMap<String, f64>), UploadError> {
    let raw = metadata.get(N_SAMPLES_KEY).ok_or_else(|| {
        UploadError::InvalidMetadata(format!("`__metadata__` must carry `{N_SAMPLES_KEY}`"))
    })?;
    let n_samples = parse_n_samples(raw, limits)?;
    let metrics = match metadata.get(METRICS_KEY) {
        None => BTreeMap::new(),
        Some(raw) => parse_metrics(raw, limits)?,
    };
    Ok((n_samples, metrics))
}

/// Reads one upload from `body` into `data` (empty; taken for `expected`'s size, or holding the
/// whole budget when `expected` is not known). When `expected` is given, the upload's tensors
/// must match it (checked from the header, before the tensor bytes are read), so they fit the
/// buffer. Its metadata must keep within `limits`.
pub async fn read_update<S>(
    mut body: S,
    expected: Option<&ModelSpec>,
    max_body_bytes: u64,
    limits: &UploadLimits,
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
            Some(Err(BodyError::TooSlow(slow))) => return Err(UploadError::TooSlow(slow)),
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
    let (n_samples, metrics) = parse_upload_metadata(&metadata, limits)?;

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
            BodyError::TooSlow(slow) => UploadError::TooSlow(slow),
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
            &UploadLimits::default(),
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
        let err = super::read_update(
            chunks(&bad, 4),
            Some(&spec()),
            1 << 20,
            &UploadLimits::default(),
            buffer,
        )
        .await;
        assert_eq!(err.unwrap_err().code(), "non_finite_values");
        assert_eq!(pool.idle_bytes(), spec().byte_len() as u64);

        let good = upload(&[1.0, 2.0, 3.0, 4.0, 5.0], "2");
        let buffer = pool.take(size).await;
        let staged = super::read_update(
            chunks(&good, 4),
            Some(&spec()),
            1 << 20,
            &UploadLimits::default(),
            buffer,
        )
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

    /// A safetensors file with `header` (JSON text) and `data`.
    fn raw_upload(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    /// An upload of `spec()` whose `__metadata__` is `metadata` (JSON object text).
    fn upload_with_metadata(metadata: &str) -> Vec<u8> {
        raw_upload(
            &format!(
                r#"{{"__metadata__":{metadata},"a":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},"b":{{"dtype":"F32","shape":[1,3],"data_offsets":[8,20]}}}}"#
            ),
            &encode_values(DType::F32, &[1.0; 5]),
        )
    }

    fn metrics_upload(metrics: &str) -> Vec<u8> {
        let metrics = serde_json::to_string(metrics).unwrap();
        upload_with_metadata(&format!(
            r#"{{"{N_SAMPLES_KEY}":"2","{METRICS_KEY}":{metrics}}}"#
        ))
    }

    async fn refusal(bytes: &[u8]) -> UploadError {
        read_update(chunks(bytes, 7), Some(&spec()), 1 << 24)
            .await
            .expect_err("the upload is refused")
    }

    #[test]
    fn canonical_decimals_are_the_only_spelling_of_a_number() {
        for good in ["0", "1", "7", "10", "4294967295", "18446744073709551616"] {
            assert!(is_canonical_decimal(good), "{good}");
        }
        for bad in [
            "", "00", "01", "+1", "-1", " 1", "1 ", "1_0", "1e3", "0x1", "%31", "١", "1.0",
        ] {
            assert!(!is_canonical_decimal(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn n_samples_must_be_canonical_and_within_the_limit() {
        let max = UploadLimits::default().max_n_samples;
        for n in ["1", "7", &max.to_string()] {
            let staged = read_update(chunks(&upload(&[1.0; 5], n), 7), Some(&spec()), 1 << 20)
                .await
                .unwrap();
            assert_eq!(staged.n_samples.to_string(), n);
        }
        let too_many = (max + 1).to_string();
        let u64_max = u64::MAX.to_string();
        for bad in [
            "+5",
            " 5",
            "5 ",
            "05",
            "0",
            "-1",
            "5.0",
            "1e3",
            "0x5",
            "",
            &too_many,
            &u64_max,
            "18446744073709551616",
        ] {
            let err = refusal(&upload(&[1.0; 5], bad)).await;
            assert_eq!(err.code(), "invalid_metadata", "{bad:?}: {err}");
            assert!(err.to_string().contains("limits.max_n_samples"), "{err}");
        }
    }

    #[tokio::test]
    async fn n_samples_bound_comes_from_the_limits() {
        let limits = UploadLimits {
            max_n_samples: 10,
            ..UploadLimits::default()
        };
        let spec = spec();
        for (n, accepted) in [("10", true), ("11", false)] {
            let read = super::read_update(
                chunks(&upload(&[1.0; 5], n), 7),
                Some(&spec),
                1 << 20,
                &limits,
                StagingBuffer::unpooled(Vec::new()),
            )
            .await;
            assert_eq!(read.is_ok(), accepted, "{n}");
        }
    }

    #[tokio::test]
    async fn metrics_are_finite_numbers_within_the_limits() {
        let limits = UploadLimits::default();
        let staged = read_update(
            chunks(&metrics_upload(r#"{"loss":0.25,"acc":1,"n":-3e5}"#), 7),
            Some(&spec()),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(
            staged.metrics,
            BTreeMap::from([
                ("acc".to_string(), 1.0),
                ("loss".to_string(), 0.25),
                ("n".to_string(), -3e5)
            ])
        );

        let many: BTreeMap<String, f64> = (0..=limits.max_metrics)
            .map(|i| (format!("m{i}"), 1.0))
            .collect();
        let many = serde_json::to_string(&many).unwrap();
        let long_key = format!(r#"{{"{}":1}}"#, "k".repeat(limits.max_metric_key_bytes + 1));
        let long_value = format!(r#"{{"loss":1{}}}"#, " ".repeat(limits.max_metrics_bytes));
        let cases = [
            (many.as_str(), "limits.max_metrics"),
            (long_key.as_str(), "limits.max_metric_key_bytes"),
            (r#"{"":1}"#, "limits.max_metric_key_bytes"),
            (long_value.as_str(), "limits.max_metrics_bytes"),
            (r#"{"loss":1e400}"#, "object of finite numbers"),
            (r#"{"loss":NaN}"#, "object of finite numbers"),
            (r#"{"loss":"0.3"}"#, "object of finite numbers"),
            (r#"{"loss":null}"#, "object of finite numbers"),
            (r#"{"loss":{"x":1}}"#, "object of finite numbers"),
            (r#"[1,2]"#, "object of finite numbers"),
            (r#"{"loss":1,"loss":2}"#, "\"loss\" appears more than once"),
        ];
        for (metrics, says) in cases {
            let err = refusal(&metrics_upload(metrics)).await;
            assert_eq!(err.code(), "invalid_metrics", "{metrics}: {err}");
            assert!(err.to_string().contains(says), "{metrics}: {err}");
        }
    }

    #[tokio::test]
    async fn seven_hundred_thousand_metrics_are_refused_before_they_are_parsed() {
        let mut metrics = String::from("{");
        for i in 0..700_000 {
            metrics.push_str(&format!(r#""metric_{i}":{i},"#));
        }
        metrics.push_str(r#""last":0}"#);
        let bytes = metrics_upload(&metrics);
        let started = std::time::Instant::now();
        let err = read_update(chunks(&bytes, 1 << 16), Some(&spec()), 1 << 26)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_metrics");
        assert!(
            err.to_string().contains("limits.max_metrics_bytes"),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[tokio::test]
    async fn duplicate_header_keys_are_refused_naming_the_key() {
        let data = encode_values(DType::F32, &[1.0; 5]);
        let twice = raw_upload(
            r#"{"__metadata__":{"rondo.n_samples":"1"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1,3],"data_offsets":[8,20]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &data,
        );
        let metadata_twice = raw_upload(
            r#"{"__metadata__":{"rondo.n_samples":"1"},"__metadata__":{"rondo.n_samples":"9"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1,3],"data_offsets":[8,20]}}"#,
            &data,
        );
        let n_samples_twice = upload_with_metadata(&format!(
            r#"{{"{N_SAMPLES_KEY}":"1","{N_SAMPLES_KEY}":"1000000"}}"#
        ));
        let field_twice = raw_upload(
            r#"{"__metadata__":{"rondo.n_samples":"1"},"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1,3],"data_offsets":[8,20]}}"#,
            &data,
        );
        for (bytes, key) in [
            (twice, "\"a\""),
            (metadata_twice, "\"__metadata__\""),
            (n_samples_twice, "\"rondo.n_samples\""),
            (field_twice, "`shape`"),
        ] {
            let err = refusal(&bytes).await;
            assert_eq!(err.code(), "malformed_safetensors", "{err}");
            assert!(err.to_string().contains(key), "{key}: {err}");
            assert!(parse_header(&bytes[8..bytes.len() - data.len()]).is_err());
        }
    }

    #[tokio::test]
    async fn a_scalar_tensor_keeps_its_empty_shape_from_upload_to_model_file() {
        let scalar = ModelSpec {
            tensors: vec![
                TensorSpec {
                    name: "s".into(),
                    dtype: DType::F32,
                    shape: vec![],
                },
                TensorSpec {
                    name: "v".into(),
                    dtype: DType::F32,
                    shape: vec![2],
                },
            ],
        };
        let bytes = raw_upload(
            r#"{"__metadata__":{"rondo.n_samples":"1"},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &encode_values(DType::F32, &[3.5, 1.0, 2.0]),
        );
        let staged = read_update(chunks(&bytes, 5), None, 1 << 20).await.unwrap();
        assert_eq!(staged.spec, scalar);
        let file = model_file(&model_header(&staged.spec, 1), &staged.data);
        let parsed = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(parsed.tensor("s").unwrap().shape(), &[] as &[usize]);
        assert_eq!(parsed.tensor("s").unwrap().data(), 3.5f32.to_le_bytes());
        let (spec, data) = read_model_file(&file).unwrap();
        assert_eq!(spec, scalar);
        assert_eq!(data, encode_values(DType::F32, &[3.5, 1.0, 2.0]));
        let mut other = scalar.clone();
        other.tensors[0].shape = vec![1];
        assert_eq!(
            read_update(chunks(&bytes, 5), Some(&other), 1 << 20)
                .await
                .unwrap_err()
                .code(),
            "model_mismatch",
            "[] and [1] are different shapes"
        );
    }

    #[test]
    fn limits_default_to_the_dev_config_and_are_validated() {
        let config: crate::config::AggregatorConfig =
            rondo_net::boot::load_config(crate::config::DEFAULTS, None).unwrap();
        assert_eq!(config.limits, UploadLimits::default());
        assert_eq!(UploadLimits::default().validate(), Ok(()));
        let with = |limits: UploadLimits| limits.validate().unwrap_err();
        let base = UploadLimits::default();
        for (limits, key) in [
            (
                UploadLimits {
                    max_n_samples: 0,
                    ..base
                },
                "limits.max_n_samples must be between 1 and 2^53",
            ),
            (
                UploadLimits {
                    max_n_samples: (1 << 53) + 1,
                    ..base
                },
                "limits.max_n_samples must be between 1 and 2^53",
            ),
            (
                UploadLimits {
                    max_metrics_bytes: (1 << 20) + 1,
                    ..base
                },
                "limits.max_metrics_bytes must be at most",
            ),
        ] {
            assert!(with(limits).contains(key), "{}", with(limits));
        }
        let unknown: Result<UploadLimits, _> = serde_json::from_str(
            r#"{"max_n_samples":1,"max_metrics":1,"max_metric_key_bytes":1,"max_metrics_bytes":2,"max_metric":3}"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("max_metric"));
    }
}
