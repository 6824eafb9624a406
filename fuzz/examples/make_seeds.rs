//! Writes the committed seed inputs, fuzz/seeds/<target>/, in the input layout of
//! `rondo_fuzz::Input`: `[selector][0][body]`, the body in one piece. Run from fuzz/:
//!
//! ```text
//! CARGO_TARGET_DIR=../target cargo run --example make_seeds
//! ```
//!
//! The RPC seeds are frames as the link writes them (a 4-byte big-endian length, then the
//! message as JSON), made from the link's own types.

use std::collections::BTreeMap;
use std::path::Path;

use rondo_core::federation::{AggregationResult, OpenRound};
use rondo_net::link::{
    AggregatorInfo, AggregatorRpcRequest, AggregatorRpcResponse, CoordinatorRpcRequest, Notice,
};
use serde::Serialize;
use serde_json::json;
use tarpc::{ClientMessage, Request, Response, context};

fn write(target: &str, name: &str, selector: u8, body: &[u8]) {
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).expect("the seeds directory can be made");
    let mut input = vec![selector, 0];
    input.extend_from_slice(body);
    std::fs::write(dir.join(name), input).expect("a seed can be written");
}

/// A safetensors upload: the 8-byte length, `header` as JSON, `data`.
fn safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(header).expect("JSON");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn upload_seeds() {
    let two_tensors = |n_samples: &str, metrics: &str| {
        json!({
            "__metadata__": {"rondo.n_samples": n_samples, "rondo.metrics": metrics},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1, 3], "data_offsets": [8, 20]},
        })
    };
    let values = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let good = safetensors(
        &two_tensors("7", r#"{"loss":0.25,"accuracy":0.9}"#),
        &values,
    );
    // Selector: low two bits the round's spec (0: none yet, 1: a F32[2] + b F32[1,3]).
    write("upload", "two_f32_tensors", 1, &good);
    write("upload", "round_zero_no_spec", 0, &good);
    let tight = safetensors(&two_tensors("10", r#"{"l":1,"m":2}"#), &values);
    write("upload", "at_the_tight_limits", 1 | 0b10_0000, &tight);
    let nan = safetensors(
        &two_tensors("7", "{}"),
        &f32s(&[1.0, f32::NAN, 3.0, 4.0, 5.0]),
    );
    write("upload", "a_nan_refused", 1, &nan);
    let mut split = vec![1, 3, 1, 7, 3];
    split.extend_from_slice(&good);
    std::fs::write("seeds/upload/in_chunks_of_1_7_3", split).expect("a seed can be written");

    let mixed = json!({
        "__metadata__": {"rondo.n_samples": "3"},
        "w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
        "v": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
        "s": {"dtype": "F64", "shape": [], "data_offsets": [16, 24]},
    });
    let mut data = [0x00, 0x3c].repeat(4); // F16 1.0, little-endian
    data.extend_from_slice(&[0x80, 0x3f].repeat(4)); // BF16 1.0
    data.extend_from_slice(&2.5f64.to_le_bytes());
    write(
        "upload",
        "f16_bf16_f64_scalar",
        2,
        &safetensors(&mixed, &data),
    );

    let empty = json!({
        "__metadata__": {"rondo.n_samples": "1"},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "x": {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]},
    });
    let data: Vec<u8> = [1.0f64, -2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write("upload", "an_empty_tensor", 3, &safetensors(&empty, &data));
}

fn json_seeds() {
    // Selector modulo 7 picks the body; see json_bodies.rs.
    write(
        "json_bodies",
        "join",
        0,
        br#"{"name":"hospital-a","can_evaluate":true}"#,
    );
    write(
        "json_bodies",
        "heartbeat_query",
        1,
        b"wait_secs=5.5&since=train:3:0",
    );
    write(
        "json_bodies",
        "evaluation",
        2,
        br#"{"round":3,"loss":0.42,"n_samples":120,"metrics":{"accuracy":0.91}}"#,
    );
    write(
        "json_bodies",
        "upload_metadata",
        3,
        b"128\0{\"loss\":0.25,\"acc\":1}",
    );
    write(
        "json_bodies",
        "upload_metadata_tight",
        3 + 7 * 18,
        b"9\0{\"loss\":1e-3}",
    );
    write("json_bodies", "bearer_token", 4, b"Bearer 4f2a9c-token");
    write("json_bodies", "round_in_path", 5, b"42");
    let header = json!({
        "__metadata__": {"rondo.n_samples": "7"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [8, 14]},
    });
    write(
        "json_bodies",
        "safetensors_header",
        6,
        &serde_json::to_vec(&header).expect("JSON"),
    );
}

/// One frame as `LengthDelimitedCodec` writes it.
fn frame(message: &impl Serialize) -> Vec<u8> {
    let json = serde_json::to_vec(message).expect("JSON");
    let mut out = (json.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

fn request<T>(id: u64, message: T) -> ClientMessage<T> {
    ClientMessage::Request(Request {
        context: context::current(),
        id,
        message,
    })
}

fn rpc_seeds() {
    let opening = OpenRound {
        round: 4,
        attempt: 1,
        grants: BTreeMap::from([
            ("p-1".to_string(), "token-one".to_string()),
            ("p-2".to_string(), "token-two".to_string()),
        ]),
    };
    // Selector modulo 6: 0 requests to the aggregator, 1 to the coordinator, 2 and 3 their
    // answers, 4 and 5 the key's handshake as server and as client.
    let mut calls = frame(&request(
        1,
        AggregatorRpcRequest::Attach {
            coordinator_rpc_addr: "127.0.0.1:7001".into(),
        },
    ));
    calls.extend(frame(&request(
        2,
        AggregatorRpcRequest::OpenRound { opening },
    )));
    calls.extend(frame(&request(
        3,
        AggregatorRpcRequest::CloseRound {
            round: 4,
            attempt: 1,
        },
    )));
    calls.extend(frame(&request(4, AggregatorRpcRequest::Status {})));
    calls.extend(frame(&ClientMessage::<AggregatorRpcRequest>::Cancel {
        trace_context: Default::default(),
        request_id: 4,
    }));
    write("rpc_messages", "aggregator_calls", 0, &calls);

    let notices = [
        Notice::Accepted {
            round: 4,
            attempt: 1,
            participant_id: "p-1".into(),
            n_samples: 120,
            metrics: BTreeMap::from([("loss".to_string(), 0.25)]),
        },
        Notice::Rejected {
            round: 4,
            attempt: 1,
            participant_id: "p-2".into(),
            reason: "non_finite_values".into(),
        },
        Notice::RoundAggregated {
            round: 4,
            attempt: 1,
            result: AggregationResult::Aggregated {
                updates: 1,
                total_samples: 120,
                contributors: BTreeMap::from([("p-1".to_string(), 120)]),
            },
        },
    ];
    let mut frames = Vec::new();
    for (id, notice) in notices.into_iter().enumerate() {
        frames.extend(frame(&request(
            id as u64,
            CoordinatorRpcRequest::Notify { notice },
        )));
    }
    write("rpc_messages", "notices", 1, &frames);

    let answer = Response {
        request_id: 1,
        message: Ok(AggregatorRpcResponse::Attach(AggregatorInfo {
            public_url: "http://127.0.0.1:8081".into(),
            model_round: Some(3),
        })),
    };
    write("rpc_messages", "attach_answer", 2, &frame(&answer));
    let mut hello = b"RONDOLK1".to_vec();
    hello.extend_from_slice(&[7; 32]);
    hello.extend_from_slice(&[9; 32]);
    write("rpc_messages", "handshake_as_client", 5, &hello);
    write("rpc_messages", "handshake_as_server", 4, &[3; 64]);
}

fn main() {
    upload_seeds();
    json_seeds();
    rpc_seeds();
}
