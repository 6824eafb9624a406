//! The tarpc link between coordinator and aggregator.
//!
//! Two services, one per direction, each over its own TCP connection with JSON frames:
//! the coordinator calls [`AggregatorRpc`] (open and close rounds, status) and the aggregator
//! calls [`CoordinatorRpc`] back with [`Notice`]s (update accepted or rejected, round aggregated). The aggregator
//! learns where to call back from [`AggregatorRpc::attach`], so neither side needs the other's
//! address in advance beyond the coordinator knowing the aggregator's.
//!
//! Every call is idempotent: a retried call never counts an update twice. Callers retry until
//! acknowledged, so a restart on either side only delays things.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use rondo_core::federation::{AggregationResult, OpenRound};
use serde::{Deserialize, Serialize};
use tarpc::serde_transport::{self, Transport};
use tarpc::tokio_serde::formats::Json;
use tarpc::tokio_serde::{Deserializer as FrameDeserializer, Serializer as FrameSerializer};
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tarpc::{client, context};
use tokio::net::TcpStream;

use crate::link_key::{self, LinkKey};

/// What the aggregator tells a coordinator that attaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AggregatorInfo {
    /// Base URL participants use to reach the aggregator's HTTP API.
    pub public_url: String,
    /// Round of the global model it holds; `None` when it has none yet.
    pub model_round: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AggregatorStatus {
    pub model_round: Option<u32>,
    /// `(round, attempt)` of the round accepting uploads, if any.
    pub open_round: Option<(u32, u32)>,
    pub accepted: Vec<String>,
}

/// Coordinator → aggregator.
#[tarpc::service]
pub trait AggregatorRpc {
    /// Registers the coordinator's RPC address for call-backs.
    async fn attach(coordinator_rpc_addr: String) -> AggregatorInfo;
    /// Opens a round. Re-opening the same `(round, attempt)` with the same grants is a no-op.
    async fn open_round(opening: OpenRound) -> Result<(), String>;
    /// Stops accepting uploads for the round and aggregates; the result comes back through
    /// [`Notice::RoundAggregated`]. Repeating it re-sends that result.
    async fn close_round(round: u32, attempt: u32) -> Result<(), String>;
    async fn status() -> AggregatorStatus;
}

/// What the aggregator tells the coordinator. One type for the message and the call that
/// carries it ([`CoordinatorRpc::notify`]): the aggregator queues these as they are, and the
/// coordinator matches on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// An update is part of the round's sum.
    Accepted {
        round: u32,
        attempt: u32,
        participant_id: String,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    },
    /// An upload was refused; the participant may try again while the round is open.
    Rejected {
        round: u32,
        attempt: u32,
        participant_id: String,
        reason: String,
    },
    /// The round is closed; `result` names every contributor of the model it made.
    RoundAggregated {
        round: u32,
        attempt: u32,
        result: AggregationResult,
    },
}

/// Aggregator → coordinator.
#[tarpc::service]
pub trait CoordinatorRpc {
    /// Idempotent: a notice heard twice changes nothing the second time.
    async fn notify(notice: Notice);
}

/// Whether a failed call means the connection is gone (reconnect) rather than a call that ran
/// past its deadline or was refused by the server (the link itself is fine: resend on it).
pub fn link_is_broken(err: &tarpc::client::RpcError) -> bool {
    !matches!(
        err,
        tarpc::client::RpcError::DeadlineExceeded | tarpc::client::RpcError::Server(_)
    )
}

/// A context whose deadline is `timeout` from now.
pub fn deadline(timeout: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// How the link proves and protects itself: the shared key's handshake (`rpc.key_file`) and
/// TLS (`[rpc.tls]`), each optional. The same for both directions of the link.
#[derive(Debug, Clone, Default)]
pub struct LinkSecurity {
    pub key: Option<LinkKey>,
    pub tls: Option<crate::tls::RpcTls>,
}

/// What a link connection reads and writes: TCP, or TLS over TCP.
pub trait LinkStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> LinkStream for S {}

/// A link connection, whichever it is.
pub type LinkConnection = Box<dyn LinkStream>;

/// A tarpc transport (length-delimited JSON frames) over `stream`.
pub fn transport<Item, SinkItem>(
    stream: LinkConnection,
) -> Transport<LinkConnection, Item, SinkItem, Json<Item, SinkItem>>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    serde_transport::new(
        LengthDelimitedCodec::builder().new_framed(stream),
        Json::default(),
    )
}

/// The longest deadline a call received over the link may carry. tarpc turns a request's
/// deadline into `Instant::now() + deadline`, which panics beyond `Instant`'s range, and then
/// into a timer of a `DelayQueue`, which panics beyond about two years: either way a peer's
/// one frame would kill the connection's task. Rondo's own calls carry their call timeout
/// (`call_timeout_secs`, at most 3600 s), far below this.
pub const MAX_CALL_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// A tarpc transport like [`transport`], for the serving side of a connection (what
/// [`serve_rpc!`](crate::serve_rpc) reads requests with): a request whose deadline is beyond
/// [`MAX_CALL_DEADLINE`] is refused as a malformed frame before tarpc reads it.
pub fn serving_transport<Item, SinkItem>(
    stream: LinkConnection,
) -> Transport<LinkConnection, Item, SinkItem, ServingJson<Item, SinkItem>>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    serde_transport::new(
        LengthDelimitedCodec::builder().new_framed(stream),
        ServingJson {
            _types: std::marker::PhantomData,
        },
    )
}

/// The link's JSON frames, with each request's deadline checked first (see
/// [`serving_transport`]).
pub struct ServingJson<Item, SinkItem> {
    /// Read and written as [`Json`] reads and writes them, made afresh per frame (it holds
    /// nothing); a function type keeps this `Unpin`, `Send` and `Sync` whatever the items are.
    _types: std::marker::PhantomData<fn() -> (Item, SinkItem)>,
}

impl<Item, SinkItem> FrameDeserializer<Item> for ServingJson<Item, SinkItem>
where
    for<'a> Item: Deserialize<'a>,
{
    type Error = serde_json::Error;

    fn deserialize(
        self: std::pin::Pin<&mut Self>,
        src: &bytes::BytesMut,
    ) -> Result<Item, Self::Error> {
        check_deadline(src)?;
        std::pin::pin!(Json::<Item, SinkItem>::default()).deserialize(src)
    }
}

impl<Item, SinkItem: Serialize> FrameSerializer<SinkItem> for ServingJson<Item, SinkItem> {
    type Error = serde_json::Error;

    fn serialize(
        self: std::pin::Pin<&mut Self>,
        item: &SinkItem,
    ) -> Result<bytes::Bytes, Self::Error> {
        std::pin::pin!(Json::<Item, SinkItem>::default()).serialize(item)
    }
}

/// tarpc's `ClientMessage` as far as its deadline: every other part, and every part that may be
/// missing, is taken as anything, so that this reads every frame tarpc would read. A frame it
/// cannot read is refused: tarpc could have converted the deadline before finding the fault.
#[derive(Deserialize)]
enum DeadlineProbe {
    Request(ProbedRequest),
    Cancel(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct ProbedRequest {
    #[serde(default)]
    context: Option<ProbedContext>,
    #[serde(default, rename = "id")]
    _id: serde::de::IgnoredAny,
    #[serde(default, rename = "message")]
    _message: serde::de::IgnoredAny,
}

#[derive(Deserialize)]
struct ProbedContext {
    /// Read as tarpc reads it: a `Duration`, as a map or a sequence.
    #[serde(default)]
    deadline: Option<Duration>,
    #[serde(default, rename = "trace_context")]
    _trace_context: serde::de::IgnoredAny,
}

fn check_deadline(frame: &[u8]) -> Result<(), serde_json::Error> {
    let probe: DeadlineProbe = serde_json::from_slice(frame)?;
    if let DeadlineProbe::Request(ProbedRequest {
        context:
            Some(ProbedContext {
                deadline: Some(deadline),
                ..
            }),
        ..
    }) = probe
        && deadline > MAX_CALL_DEADLINE
    {
        return Err(serde::de::Error::custom(format!(
            "the request's deadline is {} s away; at most {} s are accepted",
            deadline.as_secs(),
            MAX_CALL_DEADLINE.as_secs()
        )));
    }
    Ok(())
}

/// The server side of a new link connection: TLS first (when configured), then the key's
/// handshake over it. Nagle's algorithm is off: the link's messages are small and each one
/// waits for an answer, the exact case where Nagle and delayed acknowledgements together add
/// tens of milliseconds per call.
pub async fn accept_link(stream: TcpStream, security: &LinkSecurity) -> io::Result<LinkConnection> {
    stream.set_nodelay(true)?;
    let mut stream: LinkConnection = match &security.tls {
        Some(tls) => Box::new(tls.acceptor.accept(stream).await?),
        None => Box::new(stream),
    };
    link_key::accept(&mut stream, security.key.as_ref())
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    Ok(stream)
}

/// A link connection to `addr` that passed TLS (the peer's certificate verified for the host
/// of `addr`) and the key's handshake, as configured.
async fn connect_proven(addr: &str, security: &LinkSecurity) -> io::Result<LinkConnection> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream: LinkConnection = match &security.tls {
        Some(tls) => {
            let host = addr
                .rsplit_once(':')
                .map_or(addr, |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
            Box::new(tls.connector.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    link_key::connect(&mut stream, security.key.as_ref())
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, format!("{addr}: {e}")))?;
    Ok(stream)
}

/// Connects an [`AggregatorRpcClient`] to `addr`, as `security` says.
pub async fn connect_aggregator(
    addr: &str,
    security: &LinkSecurity,
) -> io::Result<AggregatorRpcClient> {
    let stream = connect_proven(addr, security).await?;
    Ok(AggregatorRpcClient::new(client::Config::default(), transport(stream)).spawn())
}

/// Connects a [`CoordinatorRpcClient`] to `addr`, as `security` says.
pub async fn connect_coordinator(
    addr: &str,
    security: &LinkSecurity,
) -> io::Result<CoordinatorRpcClient> {
    let stream = connect_proven(addr, security).await?;
    Ok(CoordinatorRpcClient::new(client::Config::default(), transport(stream)).spawn())
}

/// Serves a tarpc service on a bound `tokio::net::TcpListener` in the background, one task per
/// connection and per request, until `shutdown` (a future) resolves; evaluates to
/// `io::Result<SocketAddr>` (the bound address). A connection is served only once it passed
/// what its [`LinkSecurity`] asks for (TLS, then the key's handshake, [`accept_link`]); one
/// that fails is closed before any request is read.
///
/// A macro rather than a generic function: tarpc's service futures are only known to be `Send`
/// for a concrete server type, which the caller has.
///
/// ```ignore
/// let addr = rondo_net::serve_rpc!(listener, MyServer { .. }.serve(), shutdown.signalled(), key).await?;
/// ```
#[macro_export]
macro_rules! serve_rpc {
    ($listener:expr, $serve:expr, $shutdown:expr, $key:expr) => {
        async {
            use $crate::link::__private::*;
            let listener: tokio::net::TcpListener = $listener;
            let addr = listener.local_addr()?;
            let serve = $serve;
            let shutdown = $shutdown;
            let security: $crate::link::LinkSecurity = $key;
            tokio::spawn(async move {
                tokio::pin!(shutdown);
                loop {
                    let (stream, peer) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(err) => {
                                // e.g. out of file descriptors: pause rather than spin.
                                tracing::warn!(%err, "accepting an RPC connection failed");
                                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                        () = &mut shutdown => break,
                    };
                    let serve = serve.clone();
                    let security = security.clone();
                    // The handshakes in the connection's own task, bounded: a silent stranger
                    // must not hold up the accept loop, nor a task for long.
                    tokio::spawn(async move {
                        let accepted = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            $crate::link::accept_link(stream, &security),
                        )
                        .await;
                        let stream = match accepted {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(err)) => {
                                tracing::warn!(%peer, %err, "refused an RPC connection");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "an RPC connection did not finish its handshake in time");
                                return;
                            }
                        };
                        let transport = $crate::link::serving_transport(stream);
                        BaseChannel::with_defaults(transport)
                            .execute(serve)
                            .for_each(|response| async move {
                                tokio::spawn(response);
                            })
                            .await;
                    });
                }
            });
            std::io::Result::<std::net::SocketAddr>::Ok(addr)
        }
    };
}

#[doc(hidden)]
pub mod __private {
    pub use futures::StreamExt;
    pub use tarpc::server::{BaseChannel, Channel};
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tarpc::ClientMessage;
    use tokio::io::AsyncWriteExt;

    /// A notice to the coordinator as the link frames it, with `deadline` (JSON) in place of
    /// its own, and the first `cut` bytes of its JSON only when `cut` is given.
    fn notice_frame(deadline: serde_json::Value, cut: Option<usize>) -> Vec<u8> {
        let request = ClientMessage::Request(tarpc::Request {
            context: context::current(),
            id: 1,
            message: CoordinatorRpcRequest::Notify {
                notice: Notice::Rejected {
                    round: 1,
                    attempt: 0,
                    participant_id: "p".into(),
                    reason: "r".into(),
                },
            },
        });
        let mut json = serde_json::to_value(&request).unwrap();
        json["Request"]["context"]["deadline"] = deadline;
        let mut json = serde_json::to_vec(&json).unwrap();
        if let Some(cut) = cut {
            json.truncate(cut);
        }
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&json);
        frame
    }

    async fn read_request(
        frame: Vec<u8>,
    ) -> Option<io::Result<ClientMessage<CoordinatorRpcRequest>>> {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        peer.write_all(&frame).await.unwrap();
        drop(peer);
        let mut link = serving_transport::<
            ClientMessage<CoordinatorRpcRequest>,
            tarpc::Response<CoordinatorRpcResponse>,
        >(Box::new(ours));
        link.next().await
    }

    /// Found by `fuzz/fuzz_targets/rpc_messages.rs` (fuzz/regressions/rpc_messages/): tarpc
    /// adds a request's deadline to `Instant::now()` unchecked, so one frame panicked the
    /// connection's task.
    #[tokio::test]
    async fn a_request_whose_deadline_is_beyond_the_bound_is_refused_not_a_panic() {
        let too_far = [
            u64::MAX,
            1 << 40,
            3 * 365 * 24 * 3600, // past what tarpc's DelayQueue of deadlines takes
            MAX_CALL_DEADLINE.as_secs() + 1,
        ];
        for secs in too_far {
            for deadline in [
                serde_json::json!({"secs": secs, "nanos": 0}),
                serde_json::json!([secs, 0]),
            ] {
                let read = read_request(notice_frame(deadline.clone(), None)).await;
                assert!(matches!(read, Some(Err(_))), "{deadline}: {read:?}");
            }
        }
        // Cut after the deadline: tarpc would have read the deadline before the fault.
        let whole = notice_frame(serde_json::json!({"secs": u64::MAX, "nanos": 0}), None);
        let text = std::str::from_utf8(&whole[4..]).unwrap();
        let secs = format!("\"secs\":{}}}", u64::MAX);
        let cut = text.find(&secs).unwrap() + secs.len();
        let cut_frame = notice_frame(serde_json::json!({"secs": u64::MAX, "nanos": 0}), Some(cut));
        assert!(matches!(read_request(cut_frame).await, Some(Err(_))));

        for deadline in [
            serde_json::json!({"secs": 30, "nanos": 5}),
            serde_json::json!([MAX_CALL_DEADLINE.as_secs(), 0]),
        ] {
            let read = read_request(notice_frame(deadline.clone(), None)).await;
            assert!(
                matches!(read, Some(Ok(ClientMessage::Request(_)))),
                "{deadline}: {read:?}"
            );
        }
    }
}
