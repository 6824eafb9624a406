//! Starting a service: config, logging, listeners.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::settings::{ConfigError, FromConfig};

/// Reads a service's config: the embedded `defaults` (TOML), then `file` if given, then
/// environment variables `RONDO__SECTION__KEY` (e.g. `RONDO__API__PORT=0`).
pub fn load_config<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(defaults, config::FileFormat::Toml));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::unreadable(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder
        .add_source(
            config::Environment::with_prefix("RONDO")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(ConfigError::unreadable)
}

/// Loads and validates a service's settings (see [`load_config`]).
pub fn load_settings<S: FromConfig>(defaults: &str, file: Option<&Path>) -> Result<S, ConfigError> {
    S::from_config(load_config(defaults, file)?)
}

/// [`load_settings`] with `overrides` (TOML text) as the config file, written to a temporary
/// file of the calling thread's own: how the services' config tests read a config exactly as
/// the binary would.
pub fn load_settings_with<S: FromConfig>(
    defaults: &str,
    overrides: &str,
) -> Result<S, ConfigError> {
    let dir = std::env::temp_dir().join(format!(
        "rondo-config-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = dir.join("override.toml");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&file, overrides))
        .map_err(|err| ConfigError::unreadable(format!("writing {}: {err}", file.display())))?;
    load_settings(defaults, Some(&file))
}

/// Logs to stderr; `RUST_LOG` overrides the default filter (`info`, with tarpc's per-call
/// spans kept quiet).
pub fn init_tracing(format: crate::settings::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tarpc=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::settings::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // One object a line: the event's fields, its span (`upload`, `close`, ...) and the
        // spans around it, each with their fields (round, attempt, participant).
        crate::settings::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// What [`serve_http`] allows its connections.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Cap on the connection's read buffer (hyper's own default lets it grow to ~400 KiB while a
    /// large body streams in), and so also on the size of a request's head: a longer head gets
    /// 431 `headers_too_large`.
    pub read_buffer_max: usize,
    /// How long a client may take to send a request's head before the connection is closed.
    /// hyper runs this clock whenever it waits for a head, so it also ends a kept-alive
    /// connection idle for this long, and a connection that never sends anything.
    pub header_read_timeout: Duration,
    /// Connections served at once (`api.max_connections`). One more is answered 503
    /// `too_many_connections` (plain HTTP) or closed (TLS: no handshake is spent on it) at once,
    /// so that a flood of connections costs a file descriptor for a moment, not a task and
    /// buffers for the header timeout.
    pub max_connections: usize,
    /// `http_connections_open` and `http_connections_refused_total`.
    pub metrics: ConnectionMetrics,
}

impl Default for HttpLimits {
    /// 64 KiB of read buffer, 30 s for a request's head, 16384 connections. The aggregator
    /// pins glibc's mmap threshold at 128 KiB, so hyper's ~400 KiB buffers were each a fresh
    /// mapping, faulted in for every upload connection and unmapped after it; under the
    /// threshold they come from malloc's arenas and are reused, and a connection holds at most
    /// this much however many are open. (Measured, 100 participants × 1 MB: aggregator CPU
    /// −25 %, peak 57 → 53 MB.)
    fn default() -> Self {
        Self {
            read_buffer_max: 64 << 10,
            header_read_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            metrics: ConnectionMetrics::new(),
        }
    }
}

impl HttpLimits {
    /// The limits of `[api] max_connections` and `header_timeout_secs`, checked (their keys
    /// named in the error); the rest as [`HttpLimits::default`].
    pub fn from_config(
        max_connections: usize,
        header_timeout_secs: f64,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            max_connections: crate::settings::int(
                "api.max_connections",
                max_connections,
                1,
                MAX_CONNECTIONS,
            )?,
            header_read_timeout: crate::settings::secs(
                "api.header_timeout_secs",
                header_timeout_secs,
                0.001,
                3600.0,
            )?,
            ..Self::default()
        })
    }
}

/// More connections than this would run out of file descriptors and ports long before.
const MAX_CONNECTIONS: usize = 1 << 20;

/// How many refused connections may be being answered at once; past that they are closed
/// without an answer (a flood must not turn into as many tasks).
const REFUSALS_IN_FLIGHT: usize = 256;

/// The connection counts of [`serve_http`], for a service's registry.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    pub open: prometheus::IntGauge,
    pub refused: prometheus::IntCounter,
}

impl ConnectionMetrics {
    pub fn new() -> Self {
        Self {
            open: prometheus::IntGauge::new(
                "http_connections_open",
                "HTTP connections being served (at most api.max_connections)",
            )
            .expect("a valid metric"),
            refused: prometheus::IntCounter::new(
                "http_connections_refused_total",
                "HTTP connections refused at once because api.max_connections were open",
            )
            .expect("a valid metric"),
        }
    }

    /// Both metrics, to register with the service's others.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.open.clone()), Box::new(self.refused.clone())]
    }
}

impl Default for ConnectionMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds one of [`HttpLimits::max_connections`] for as long as its connection is served.
struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Answers a connection over the limit with 503 `too_many_connections` and closes it gently
/// (the write side first, then what the client sends is read and dropped for a moment, so that
/// it reads the answer rather than a reset), all within a second.
async fn refuse_connection(mut stream: tokio::net::TcpStream, max_connections: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!(
            "the server is serving {max_connections} connections, its limit \
             (api.max_connections); try again shortly"
        ),
    }})
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` completes; then stops
/// accepting and lets the requests in flight finish.
///
/// `axum::serve` with what it does not expose: each connection's read buffer is capped, and the
/// time to read a request's head is limited (hyper enforces that only with a timer, which
/// `axum::serve` does not set), both per `limits`. Nagle's algorithm is off on every connection:
/// answers are written as soon as they are ready rather than held for the peer's
/// acknowledgement of the last segment. Requests that hyper refuses before the router sees them
/// (unparsable, head too large) get the JSON error body like every other error.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(limits.read_buffer_max)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // hyper's own limit on a head is its read buffer, which can take in more than its cap in
    // one read: a head a little over the cap may pass or not. This makes the limit exact.
    let router = router.layer(
        tower_http::validate_request::ValidateRequestHeaderLayer::custom(HeadLimit(
            limits.read_buffer_max,
        )),
    );
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusals = std::sync::Arc::new(tokio::sync::Semaphore::new(REFUSALS_IN_FLIGHT));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // e.g. out of file descriptors: pause rather than spin.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            limits.metrics.refused.inc();
            if limits.metrics.refused.get() % 1000 == 1 {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused_so_far = limits.metrics.refused.get(),
                    "refusing connections: api.max_connections are open"
                );
            }
            // Over TLS an answer would need a handshake first: those are just closed.
            if tls.is_none()
                && let Ok(refusing) = refusals.clone().try_acquire_owned()
            {
                let max = limits.max_connections;
                tokio::spawn(async move {
                    refuse_connection(stream, max).await;
                    drop(refusing);
                });
            }
            continue;
        };
        limits.metrics.open.inc();
        let slot = ConnectionSlot {
            _permit: permit,
            open: limits.metrics.open.clone(),
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        // The peer's address, for per-address limits (`axum::extract::ConnectInfo`).
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                router.clone(),
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    request
                },
            ));
        match &tls {
            None => {
                let stream = JsonParseErrors::new(stream, limits.read_buffer_max);
                let connection =
                    graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(%err, "HTTP connection ended with an error");
                    }
                    drop(slot);
                });
            }
            Some(crate::tls::ServerTls(acceptor)) => {
                // The handshake on the connection's own task, bounded like a request head: a
                // client that never finishes it neither holds the accept loop nor lingers.
                let handshake = acceptor.accept(stream);
                let (http, head_max) = (http.clone(), limits.read_buffer_max);
                let timeout = limits.header_read_timeout;
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(%err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let stream = JsonParseErrors::new(stream, head_max);
                    let connection =
                        watcher.watch(http.serve_connection(TokioIo::new(stream), service));
                    if let Err(err) = connection.await {
                        tracing::debug!(%err, "HTTPS connection ended with an error");
                    }
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    // Requests in flight get a while to finish; a stalled client does not hold the exit.
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 10 s of shutdown; closing them");
    }
}

/// Answers 431 (JSON) to a request whose head (request line and headers, as they would be
/// written) is longer than `.0` bytes.
#[derive(Debug, Clone, Copy)]
struct HeadLimit(usize);

impl<B> tower_http::validate_request::ValidateRequest<B> for HeadLimit {
    type ResponseBody = axum::body::Body;

    fn validate(
        &mut self,
        request: &mut axum::http::Request<B>,
    ) -> Result<(), axum::response::Response> {
        // "METHOD URI HTTP/1.1\r\n", "name: value\r\n" for each header, "\r\n".
        let uri = request.uri();
        let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        let line = request.method().as_str().len() + target + 12;
        let headers: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if line + headers + 2 <= self.0 {
            return Ok(());
        }
        Err(crate::api::closing(crate::api::ApiError::new(
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request's head is larger than {} bytes", self.0),
        )))
    }
}

/// A connection's stream that turns the error answers hyper writes on its own into answers
/// with Rondo's JSON error body.
///
/// When hyper cannot parse a request's head (a garbage request line, `Content-Length: abc`, a
/// head larger than its read buffer) it answers 400, 414 or 431 itself, with an empty body, and
/// the request never reaches the router; hyper 1.x has no hook to shape that answer. Its answer
/// is always exactly a head of `connection: close`, `content-length: 0` and `date` headers,
/// written in one piece at a message boundary, after which hyper closes the connection. A
/// write that is exactly such a head is swapped here for the same status with a JSON body.
/// (Rondo's routers never answer a 4xx without a body, and a response body is never written
/// in the same buffer as its head, so nothing else can match.) Then, as hyper may not have
/// read all of what the client sent, the connection is closed gently: the write side first,
/// reading and discarding the rest for a moment, so that the client gets the answer rather
/// than a reset.
/// What a connection of [`serve_http`] reads and writes: a TCP stream, or TLS over one.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for S {}

struct JsonParseErrors<S: Connection> {
    inner: Option<S>,
    /// The JSON answer, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
    head_max: usize,
}

impl<S: Connection> JsonParseErrors<S> {
    fn new(inner: S, head_max: usize) -> Self {
        Self {
            inner: Some(inner),
            replacement: None,
            head_max,
        }
    }
}

/// The JSON answer for hyper's own answer `head`, if `head` is one.
fn json_parse_error(head: &[u8], head_max: usize) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    let (code, message) = match status {
        "400" => (
            "bad_request",
            "the request is not valid HTTP/1.1 (its request line or a header, such as \
             Content-Length, is malformed)"
                .to_string(),
        ),
        "414" => ("uri_too_long", "the request's URI is too long".to_string()),
        "431" => (
            "headers_too_large",
            format!("the request's head is larger than {head_max} bytes"),
        ),
        _ => return None,
    };
    let mut date = None;
    let (mut close, mut empty) = (false, false);
    for line in lines {
        match line {
            "connection: close" if !close => close = true,
            "content-length: 0" if !empty => empty = true,
            _ if date.is_none() && line.starts_with("date: ") => date = Some(line),
            _ => return None,
        }
    }
    if !(close && empty) {
        return None;
    }
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut answer = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        answer.push_str(date);
        answer.push_str("\r\n");
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

/// hyper's own error answers are a status line and three short headers.
const HYPER_ERROR_HEAD_MAX: usize = 256;

impl<S: Connection> JsonParseErrors<S> {
    /// Writes what is left of the replacement answer, if any.
    fn poll_replacement(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let (Some(inner), Some((answer, written))) =
            (self.inner.as_mut(), self.replacement.as_mut())
        else {
            return Poll::Ready(Ok(()));
        };
        while *written < answer.len() {
            match std::pin::Pin::new(&mut *inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether a write of `total` bytes starting with `first` is hyper's own error answer, now
    /// replaced (hyper's answer is written as one buffer, so `first` must be all of it).
    fn replaces(&mut self, first: &[u8], total: usize) -> bool {
        // Checked before anything else, as every write of every answer passes here: a write
        // that is not a short 4xx head is let through without reading it (a model download
        // is written in large pieces, and re-writes of what a full socket did not take).
        if self.replacement.is_some()
            || first.len() != total
            || total > HYPER_ERROR_HEAD_MAX
            || !first.starts_with(b"HTTP/1.1 4")
        {
            return false;
        }
        self.replacement = json_parse_error(first, self.head_max).map(|answer| (answer, 0));
        self.replacement.is_some()
    }

    fn inner(&mut self) -> std::io::Result<&mut S> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::ErrorKind::NotConnected.into())
    }
}

impl<S: Connection> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => std::pin::Pin::new(inner).poll_read(cx, buf),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl<S: Connection> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        if this.replaces(buf, buf.len()) {
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(this.inner()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs
            .first()
            .is_some_and(|first| this.replaces(first, total))
        {
            return std::task::Poll::Ready(Ok(total));
        }
        std::pin::Pin::new(this.inner()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        std::pin::Pin::new(this.inner()?).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        std::pin::Pin::new(this.inner()?).poll_shutdown(cx)
    }
}

impl<S: Connection> Drop for JsonParseErrors<S> {
    fn drop(&mut self) {
        // Only after a replaced answer: the usual case needs no lingering.
        if self.replacement.is_none() {
            return;
        }
        let (Some(stream), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(linger(stream));
    }
}

/// Closes `stream` without a reset: shuts the write side, then reads and discards what the
/// client still sends, for at most a second and 1 MiB. Closing a socket with unread bytes makes
/// the kernel send a reset, and a client that receives it may lose the answer unread.
async fn linger<S: Connection>(mut stream: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = (&mut stream).take(1 << 20);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::copy(&mut sink, &mut tokio::io::sink()),
    )
    .await;
}

pub async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding {host}:{port}"))
}

/// Writes `{"api": "127.0.0.1:8081", "rpc": …}` to `path` (atomically: a reader never sees half
/// a file), so that scripts and tests can find services started on port 0.
pub fn write_addresses(path: &str, addresses: &BTreeMap<&str, SocketAddr>) -> anyhow::Result<()> {
    if path.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string_pretty(addresses)?;
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {tmp}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {path}"))?;
    Ok(())
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Command line shared by both binaries.
#[derive(Debug, clap::Parser)]
struct Cli {
    /// TOML config file (keys left out keep the built-in defaults; RONDO__SECTION__KEY
    /// environment variables override both).
    #[arg(short, long)]
    config: Option<std::path::PathBuf>,
}

/// The whole `main` of a Rondo binary: parse `-c FILE`, load and validate the config over
/// `defaults`, run. Errors end the process with a one-line message, never a panic: exit code 2
/// for a config that cannot be used (the message names the key; also when `run` finds it so and
/// returns a [`crate::settings::ConfigError`]), 1 for a failure while running.
pub async fn main<S, F, Fut>(
    name: &'static str,
    about: &'static str,
    defaults: &str,
    run: F,
) -> std::process::ExitCode
where
    S: FromConfig,
    F: FnOnce(S) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .name(name)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let settings = match load_settings::<S>(defaults, cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("{name}: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    // After the config, which says in what format; a config error is one line on stderr.
    init_tracing(settings.log_format());
    match run(settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Found unusable only once running started (e.g. a plug-in the config names that
        // cannot be loaded): still the config's fault.
        Err(err) if err.downcast_ref::<crate::settings::ConfigError>().is_some() => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// `serve_http` on a free port, answering `GET /` with "ok", until the sender is used.
    async fn serving(limits: HttpLimits) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
        let listener = bind("127.0.0.1", 0).await.expect("binding a free port");
        let addr = listener.local_addr().expect("a bound address");
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route("/lookalike", axum::routing::get(|| async { LOOKALIKE }))
            .route(
                "/upload",
                axum::routing::post(
                    |body: axum::body::Bytes| async move { body.len().to_string() },
                )
                .route_layer(crate::api::reject_oversized(1000, "body_too_large")),
            );
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve_http(listener, router, limits, None, shutdown));
        (addr, stop, server)
    }

    /// Sends `request` and reads until the server closes the connection (at most 5 s).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting");
        stream.write_all(request).await.expect("sending");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closed the connection within 5 s")
            .expect("reading the answer");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// What hyper writes when it cannot parse a request, as a response body.
    const LOOKALIKE: &str =
        "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

    /// The status line and the JSON error of an answer.
    fn json_error(answer: &str) -> (&str, serde_json::Value) {
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.contains("content-type: application/json"), "{answer}");
        let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        (
            head.lines().next().unwrap_or_default(),
            json["error"]["code"].clone(),
        )
    }

    #[tokio::test]
    async fn requests_hyper_cannot_parse_get_the_json_error_body() {
        let (addr, _stop, _server) = serving(HttpLimits::default()).await;
        let big_header = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        );
        let just_over = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(65_600)
        );
        for (request, status, code) in [
            (
                "GARBAGE\r\n\r\n".to_string(),
                "HTTP/1.1 400 Bad Request",
                "bad_request",
            ),
            (
                "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_string(),
                "HTTP/1.1 400 Bad Request",
                "bad_request",
            ),
            (
                big_header,
                "HTTP/1.1 431 Request Header Fields Too Large",
                "headers_too_large",
            ),
            (
                just_over,
                "HTTP/1.1 431 Request Header Fields Too Large",
                "headers_too_large",
            ),
        ] {
            let answer = exchange(addr, request.as_bytes()).await;
            let (status_line, error_code) = json_error(&answer);
            assert_eq!(status_line, status, "{answer}");
            assert_eq!(error_code, code, "{answer}");
        }
    }

    #[tokio::test]
    async fn a_response_that_looks_like_hypers_error_answer_is_left_alone() {
        let (addr, _stop, _server) = serving(HttpLimits::default()).await;
        let answer = exchange(
            addr,
            b"GET /lookalike HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with(&format!("\r\n\r\n{LOOKALIKE}")),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
        let (addr, _stop, _server) = serving(HttpLimits::default()).await;
        let started = std::time::Instant::now();
        // The body never comes: only an answer from the head alone ends the exchange.
        let answer = exchange(
            addr,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n",
        )
        .await;
        let (status_line, code) = json_error(&answer);
        assert_eq!(status_line, "HTTP/1.1 413 Payload Too Large", "{answer}");
        assert_eq!(code, "body_too_large");
        assert!(started.elapsed() < Duration::from_secs(1));
        let answer = exchange(
            addr,
            format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}",
                "b".repeat(1000)
            )
            .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn answers_requests_and_returns_once_told_to_stop() {
        let (addr, stop, server) = serving(HttpLimits::default()).await;
        let answer = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        stop.send(()).expect("the server is listening for the stop");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve_http returned within 5 s of the stop")
            .expect("the server task did not panic");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
        let limits = HttpLimits {
            header_read_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        };
        let (addr, _stop, _server) = serving(limits).await;
        let started = std::time::Instant::now();
        // The head's closing empty line never comes. Without the timeout, hyper would wait for
        // it for ever and `exchange` would fail its own 5 s limit.
        let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        assert!(!answer.contains(" 200 "), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
