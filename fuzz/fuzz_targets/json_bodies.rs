//! The JSON bodies and query strings the two HTTP APIs read, through the functions their
//! handlers call: the coordinator's join body, heartbeat query and evaluation body; the
//! aggregator's upload metadata (`rondo.n_samples`, `rondo.metrics`) and safetensors header;
//! and the bearer token and the `{round}` of a path, which both read.
//!
//! Checked beyond "no panic": what is accepted keeps within the documented bounds, a header
//! Rondo writes for an accepted spec reads back as that spec, and the coordinator sends on
//! (redirects) exactly the round numbers the aggregator accepts.
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use libfuzzer_sys::fuzz_target;
use rondo_aggregator::wire::{self, METRICS_KEY, N_SAMPLES_KEY, ROUND_KEY, UploadLimits};
use rondo_coordinator::http::{
    EvaluationBody, HeartbeatQuery, JoinRequest, MAX_HEARTBEAT_WAIT, MAX_NAME_BYTES,
    is_round_number,
};
use rondo_fuzz::Input;

fn join(body: &[u8]) {
    if let Ok(request) = JoinRequest::from_body(body) {
        assert!(request.name.is_none_or(|name| name.len() <= MAX_NAME_BYTES));
    }
}

fn heartbeat(body: &[u8]) {
    let Ok(query) = std::str::from_utf8(body) else {
        return;
    };
    // What hyper would not take as a request target never reaches the handler.
    let Ok(uri) = Uri::try_from(format!("/v1/participants/p/heartbeat?{query}")) else {
        return;
    };
    let Ok(Query(query)) = Query::<HeartbeatQuery>::try_from_uri(&uri) else {
        return;
    };
    for timeout in [
        Duration::from_millis(1),
        Duration::from_secs(20),
        Duration::MAX,
    ] {
        if let Ok(wait) = query.wait(timeout) {
            assert!(
                wait <= MAX_HEARTBEAT_WAIT && wait <= timeout / 2,
                "{wait:?}"
            );
        }
    }
}

fn evaluation(body: &[u8]) {
    if let Ok(request) = EvaluationBody::from_body(body) {
        // JSON has no NaN or infinity, and an out-of-range number is refused, not rounded.
        assert!(request.loss.is_finite());
        assert!(request.metrics.values().all(|v| v.is_finite()));
    }
}

fn limits(selector: u8) -> UploadLimits {
    if selector & 0b1000_0000 == 0 {
        UploadLimits::default()
    } else {
        UploadLimits {
            max_n_samples: 1 << 53,
            max_metrics: 3,
            max_metric_key_bytes: 5,
            max_metrics_bytes: 100,
        }
    }
}

/// The body is `n_samples` NUL `metrics`: the two values of `__metadata__` as text.
fn upload_metadata(selector: u8, body: &[u8]) {
    let (n_samples, metrics) = match body.iter().position(|&b| b == 0) {
        Some(at) => (&body[..at], Some(&body[at + 1..])),
        None => (body, None),
    };
    let Ok(n_samples) = std::str::from_utf8(n_samples) else {
        return;
    };
    let mut metadata = HashMap::from([(N_SAMPLES_KEY.to_string(), n_samples.to_string())]);
    if let Some(metrics) = metrics {
        let Ok(metrics) = std::str::from_utf8(metrics) else {
            return;
        };
        metadata.insert(METRICS_KEY.to_string(), metrics.to_string());
    }
    let limits = limits(selector);
    let Ok((n, metrics)) = wire::parse_upload_metadata(&metadata, &limits) else {
        return;
    };
    assert_eq!(
        n.to_string(),
        n_samples,
        "one spelling of each sample count"
    );
    assert!((1..=limits.max_n_samples).contains(&n));
    assert!(metrics.len() <= limits.max_metrics);
    for (name, value) in &metrics {
        assert!(!name.is_empty() && name.len() <= limits.max_metric_key_bytes);
        assert!(value.is_finite());
    }
}

fn bearer(body: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(body) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value);
    if let Ok(token) = rondo_net::api::bearer_token(&headers, "missing_token") {
        assert!(!token.is_empty() && token == token.trim());
        assert!(body.starts_with(b"Bearer "));
    }
}

fn round_in_path(body: &[u8]) {
    let Ok(raw) = std::str::from_utf8(body) else {
        return;
    };
    let aggregator_reads = wire::is_canonical_decimal(raw) && raw.parse::<u32>().is_ok();
    assert_eq!(
        is_round_number(raw),
        aggregator_reads,
        "the coordinator redirects {raw:?} to an aggregator that would refuse it, or the reverse"
    );
}

fn safetensors_header(body: &[u8]) {
    let Ok((spec, _metadata)) = wire::parse_header(body) else {
        return;
    };
    assert!(!spec.tensors.is_empty());
    let written = wire::model_header(&spec, 7);
    assert_eq!(written.len() % 8, 0, "tensor data stays aligned");
    let (read_back, metadata) =
        wire::parse_header(&written[8..]).expect("a header Rondo writes reads back");
    assert_eq!(read_back, spec);
    assert_eq!(metadata.get(ROUND_KEY).map(String::as_str), Some("7"));
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    match input.selector % 7 {
        0 => join(input.body),
        1 => heartbeat(input.body),
        2 => evaluation(input.body),
        3 => upload_metadata(input.selector, input.body),
        4 => bearer(input.body),
        5 => round_in_path(input.body),
        _ => safetensors_header(input.body),
    }
});
