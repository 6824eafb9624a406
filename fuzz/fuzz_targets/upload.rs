//! The aggregator's upload parser: a body as `POST /v1/rounds/{r}/update` streams it in, read by
//! `wire::read_update` into a buffer from a `StagingPool`, as `http::read_body` does, against
//! one of a few round model specs (or none: round 0 before its first upload).
//!
//! Checked beyond "no panic": an accepted upload is exactly the body (8-byte length, header,
//! tensor bytes, nothing after), within the body limit, matches the round's spec, holds only
//! finite values and metadata within the limits; and the body in one chunk or in the input's
//! chunks is accepted or refused alike, an accepted one read into the same update.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rondo_aggregator::staging::StagingPool;
use rondo_aggregator::wire::{self, BodyError, StagedUpdate, UploadError, UploadLimits};
use rondo_core::kernels::all_finite;
use rondo_core::model::{DType, ModelSpec, TensorSpec};
use rondo_fuzz::{Input, block_on};

fn tensor(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// The round's model, by the selector's low two bits.
fn expected_spec(selector: u8) -> Option<ModelSpec> {
    let tensors = match selector & 0b11 {
        0 => return None,
        1 => vec![
            tensor("a", DType::F32, &[2]),
            tensor("b", DType::F32, &[1, 3]),
        ],
        2 => vec![
            tensor("w", DType::F16, &[4]),
            tensor("v", DType::BF16, &[2, 2]),
            tensor("s", DType::F64, &[]),
        ],
        _ => vec![tensor("e", DType::F32, &[0]), tensor("x", DType::F64, &[3])],
    };
    Some(ModelSpec { tensors })
}

fn max_body_bytes(selector: u8) -> u64 {
    [1 << 20, 4096, 256, 64][usize::from((selector >> 2) & 0b11)]
}

fn limits(selector: u8) -> UploadLimits {
    if selector & 0b10_0000 == 0 {
        UploadLimits::default()
    } else {
        UploadLimits {
            max_n_samples: 10,
            max_metrics: 2,
            max_metric_key_bytes: 4,
            max_metrics_bytes: 64,
        }
    }
}

/// What a reading of the body came to, to compare two readings.
#[derive(Debug, PartialEq)]
enum Verdict {
    Accepted {
        spec: ModelSpec,
        data: Vec<u8>,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    },
    Refused,
}

fn read(
    pool: &StagingPool,
    chunks: Vec<Bytes>,
    expected: Option<&ModelSpec>,
    max_body_bytes: u64,
    limits: &UploadLimits,
) -> Result<StagedUpdate, UploadError> {
    block_on(async {
        let staging = pool.take(expected.map(ModelSpec::byte_len)).await;
        let body = futures::stream::iter(chunks.into_iter().map(Ok::<_, BodyError>));
        wire::read_update(body, expected, max_body_bytes, limits, staging).await
    })
}

fn check_accepted(
    staged: &StagedUpdate,
    body: &[u8],
    expected: Option<&ModelSpec>,
    max_body_bytes: u64,
    limits: &UploadLimits,
) {
    assert!(
        body.len() as u64 <= max_body_bytes,
        "accepted past the body limit"
    );
    let header_len = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let data_start = 8 + header_len as usize;
    assert_eq!(
        body.len(),
        data_start + staged.spec.byte_len(),
        "the body is exactly its header and the tensors it declares"
    );
    assert_eq!(
        &staged.data[..],
        &body[data_start..],
        "the staged bytes are the sent ones"
    );
    if let Some(expected) = expected {
        assert!(
            expected.check_update(&staged.spec).is_ok(),
            "accepted against the spec"
        );
    }
    assert!(!staged.spec.tensors.is_empty());
    let mut start = 0;
    for t in &staged.spec.tensors {
        let end = start + t.byte_len();
        assert!(
            all_finite(t.dtype, &staged.data[start..end]),
            "tensor {} finite",
            t.name
        );
        start = end;
    }
    assert!((1..=limits.max_n_samples).contains(&staged.n_samples));
    assert!(staged.metrics.len() <= limits.max_metrics);
    for (name, value) in &staged.metrics {
        assert!(!name.is_empty() && name.len() <= limits.max_metric_key_bytes);
        assert!(value.is_finite());
    }
}

fn verdict(
    read: Result<StagedUpdate, UploadError>,
    body: &[u8],
    expected: Option<&ModelSpec>,
    max_body_bytes: u64,
    limits: &UploadLimits,
) -> Verdict {
    match read {
        Ok(staged) => {
            check_accepted(&staged, body, expected, max_body_bytes, limits);
            Verdict::Accepted {
                spec: staged.spec.clone(),
                data: staged.data.to_vec(),
                n_samples: staged.n_samples,
                metrics: staged.metrics.clone(),
            }
        }
        Err(err) => {
            // Every refusal names its API code; the message is what the participant reads.
            assert!(!err.code().is_empty());
            let _ = err.to_string();
            Verdict::Refused
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let expected = expected_spec(input.selector);
    let max_body_bytes = max_body_bytes(input.selector);
    let limits = limits(input.selector);
    let reuse = input.selector & 0b1_0000 != 0;
    let gauge = prometheus::IntGauge::new("idle", "idle staging bytes").expect("a valid gauge");
    let pool = StagingPool::new(4 << 20, reuse, gauge);

    let whole = read(
        &pool,
        vec![Bytes::copy_from_slice(input.body)],
        expected.as_ref(),
        max_body_bytes,
        &limits,
    );
    let whole = verdict(
        whole,
        input.body,
        expected.as_ref(),
        max_body_bytes,
        &limits,
    );
    let chunked = read(
        &pool,
        input.chunks(),
        expected.as_ref(),
        max_body_bytes,
        &limits,
    );
    let chunked = verdict(
        chunked,
        input.body,
        expected.as_ref(),
        max_body_bytes,
        &limits,
    );
    // Two faults in one body may be found in either order, so the codes of two refusals may
    // differ; whether the upload is accepted, and as what, may not.
    assert_eq!(whole, chunked, "the chunking changed the verdict");
    if !reuse {
        // Nothing is pooled: every upload, accepted or refused, gave its staging budget back.
        assert_eq!(pool.available_units(), pool.budget_units() as usize);
    }
});
