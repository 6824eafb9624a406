//! The messages of the tarpc link, read exactly as the link reads them: length-delimited JSON
//! frames through `rondo_net::link::serving_transport` (requests, on the side that serves them)
//! and `rondo_net::link::transport` (answers, on the side that called), for both services'
//! directions; and the shared key's handshake, both roles, against a peer that sends the input.
//!
//! Checked beyond "no panic": no request is read with a deadline beyond `MAX_CALL_DEADLINE`; a
//! `Notice` or `OpenRound` read off the link writes back as JSON that reads back the same; the
//! frames are read alike whatever chunks they arrive in; and no handshake passes without the key.
#![no_main]

use std::fmt::Debug;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use rondo_fuzz::{ChunkedStream, Input, block_on};
use rondo_net::link::{
    AggregatorRpcRequest, AggregatorRpcResponse, CoordinatorRpcRequest, CoordinatorRpcResponse,
    LinkConnection, MAX_CALL_DEADLINE, serving_transport, transport,
};
use rondo_net::link_key::{self, LinkKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tarpc::{ClientMessage, Response};

fn stream(chunks: Vec<Bytes>) -> LinkConnection {
    Box::new(ChunkedStream::new(chunks))
}

/// Every frame up to the first that does not read (the link closes there), each as text that
/// does not depend on the clock.
fn requests<Req, Resp>(chunks: Vec<Bytes>, check: impl Fn(&Req)) -> Vec<String>
where
    Req: DeserializeOwned + Debug,
    Resp: Serialize,
{
    block_on(async {
        let mut link = std::pin::pin!(serving_transport::<ClientMessage<Req>, Response<Resp>>(
            stream(chunks)
        ));
        let mut read = Vec::new();
        while let Some(Ok(message)) = link.next().await {
            let text = match message {
                ClientMessage::Request(request) => {
                    let latest = Instant::now() + MAX_CALL_DEADLINE + Duration::from_secs(1);
                    assert!(
                        request.context.deadline <= latest,
                        "a deadline past the bound"
                    );
                    check(&request.message);
                    format!("request {} {:?}", request.id, request.message)
                }
                ClientMessage::Cancel { request_id, .. } => format!("cancel {request_id}"),
                other => format!("{other:?}"),
            };
            read.push(text);
        }
        read
    })
}

fn answers<Resp, Req>(chunks: Vec<Bytes>) -> Vec<String>
where
    Resp: DeserializeOwned + Debug,
    Req: Serialize,
{
    block_on(async {
        let mut link = std::pin::pin!(transport::<Response<Resp>, ClientMessage<Req>>(stream(
            chunks
        )));
        let mut read = Vec::new();
        while let Some(Ok(answer)) = link.next().await {
            read.push(format!("{answer:?}"));
        }
        read
    })
}

/// What the link reads, written as JSON again, reads back the same.
fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let json = serde_json::to_vec(value).expect("what was read can be written");
    let back: T = serde_json::from_slice(&json).expect("what was written reads back");
    assert_eq!(&back, value);
}

fn aggregator_request(request: &AggregatorRpcRequest) {
    if let AggregatorRpcRequest::OpenRound { opening } = request {
        round_trips(opening);
    }
}

fn coordinator_request(request: &CoordinatorRpcRequest) {
    let CoordinatorRpcRequest::Notify { notice } = request;
    round_trips(notice);
}

fn key() -> LinkKey {
    LinkKey::new(b"a link key the fuzzer does not know").expect("long enough")
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let whole = || vec![Bytes::copy_from_slice(input.body)];
    let (once, chunked) = match input.selector % 6 {
        0 => (
            requests::<AggregatorRpcRequest, AggregatorRpcResponse>(whole(), aggregator_request),
            requests::<AggregatorRpcRequest, AggregatorRpcResponse>(
                input.chunks(),
                aggregator_request,
            ),
        ),
        1 => (
            requests::<CoordinatorRpcRequest, CoordinatorRpcResponse>(whole(), coordinator_request),
            requests::<CoordinatorRpcRequest, CoordinatorRpcResponse>(
                input.chunks(),
                coordinator_request,
            ),
        ),
        2 => (
            answers::<AggregatorRpcResponse, AggregatorRpcRequest>(whole()),
            answers::<AggregatorRpcResponse, AggregatorRpcRequest>(input.chunks()),
        ),
        3 => (
            answers::<CoordinatorRpcResponse, CoordinatorRpcRequest>(whole()),
            answers::<CoordinatorRpcResponse, CoordinatorRpcRequest>(input.chunks()),
        ),
        4 => {
            let mut peer = ChunkedStream::new(input.chunks());
            let passed = block_on(link_key::accept(&mut peer, Some(&key())));
            assert!(passed.is_err(), "a client passed without the key");
            return;
        }
        _ => {
            let mut peer = ChunkedStream::new(input.chunks());
            let passed = block_on(link_key::connect(&mut peer, Some(&key())));
            assert!(passed.is_err(), "a server passed without the key");
            return;
        }
    };
    assert_eq!(once, chunked, "the chunking changed what was read");
});
