//! Starting a service: config, logging, listeners.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
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

/// Logs to stderr; `RUST_LOG` overrides the default filter (`info`, with tarpc's per-call
/// spans kept quiet).
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tarpc=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// What [`serve_http`] allows an HTTP connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Cap on the connection's read buffer (hyper's own default lets it grow to ~400 KiB while a
    /// large body streams in), and so also on the size of a request's head.
    pub read_buffer_max: usize,
    /// How long a client may take to send a request's head before the connection is closed.
    pub header_read_timeout: Duration,
}

impl Default for HttpLimits {
    /// 64 KiB of read buffer, 30 s for a request's head. The aggregator pins glibc's mmap
    /// threshold at 128 KiB, so hyper's ~400 KiB buffers were each a fresh mapping, faulted in
    /// for every upload connection and unmapped after it; under the threshold they come from
    /// malloc's arenas and are reused, and a connection holds at most this much however many
    /// are open. (Measured, 100 participants × 1 MB: aggregator CPU −25 %, peak 57 → 53 MB.)
    fn default() -> Self {
        Self {
            read_buffer_max: 64 << 10,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` completes; then stops
/// accepting and lets the requests in flight finish.
///
/// `axum::serve` with what it does not expose: each connection's read buffer is capped, and the
/// time to read a request's head is limited (hyper enforces that only with a timer, which
/// `axum::serve` does not set), both per `limits`. Nagle's algorithm is off on every connection:
/// answers are written as soon as they are ready rather than held for the peer's
/// acknowledgement of the last segment.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(limits.read_buffer_max)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // e.g. out of file descriptors: pause rather than spin.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
/// for a config that cannot be used (the message names the key), 1 for a failure while running.
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
    init_tracing();
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
    match run(settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
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
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve_http(listener, router, limits, shutdown));
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
