//! Load generator for the coordinator's participant API: N participants join, then each
//! heartbeats on its own keep-alive connection, as N separate programs would.
//!
//! Two modes:
//!
//! - `plain`: one heartbeat a second per participant, the start times spread evenly over the
//!   second (participant i at i/N of it). Each heartbeat's latency runs from just before the
//!   request is handed to the connection to the last byte of the answer's body. The lateness
//!   of each send against its slot is recorded too: a generator that falls behind shows it
//!   there instead of quietly sending fewer heartbeats.
//! - `long-poll`: as the SDK does, each participant sends `since=<state of the last answer>`
//!   and `wait_secs`, and asks again as soon as an answer comes. An answer with a new state is
//!   news; for every new state the time each participant heard it is recorded, counted from
//!   the first participant that heard it (the earliest moment the generator can see that the
//!   coordinator had something to say).
//!
//! It prints `measuring` and `measured` lines on stdout when the measured window opens and
//! closes (the driver samples the coordinator's CPU then), and finally one JSON report.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Plain,
    LongPoll,
}

#[derive(Debug, Parser)]
#[command(about = "Join N participants to a coordinator and heartbeat them, measuring latency")]
struct Args {
    /// The coordinator's API address, host:port (plain HTTP on loopback).
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    participants: usize,
    /// Joins in flight at once (each on a new connection, which its participant then keeps).
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Heartbeats before the measured window, once every participant has joined.
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// Length of the measured window.
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
    /// Each participant's heartbeat period (plain mode).
    #[arg(long, default_value_t = 1.0)]
    period_secs: f64,
    #[arg(long, value_enum, default_value_t = Mode::Plain)]
    mode: Mode,
    /// `wait_secs` of each long poll (the coordinator caps it at 30 s and heartbeat_timeout/2).
    #[arg(long, default_value_t = 30.0)]
    wait_secs: f64,
    /// A request unanswered for this long (beyond `wait_secs` for long polls) is an error.
    #[arg(long, default_value_t = 10.0)]
    request_timeout_secs: f64,
    /// The federation's join secret, sent as the bearer token of each join.
    #[arg(long)]
    join_secret: Option<String>,
    /// Tokio worker threads. One keeps 10,000 heartbeats a second at about half a core; on
    /// two cores a second worker only takes them from the coordinator (measured: p99 36 ms
    /// with two, 11 ms with one, the generator's CPU 52 % and 44 %).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Microseconds: hdrhistogram counts integers, 3 significant digits up to an hour.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

/// What every participant adds to, behind one lock (a few thousand short visits a second).
#[derive(Default)]
struct Shared {
    stats: Mutex<Stats>,
    /// When the measured window opens: set once every participant has joined.
    window: OnceLock<(Instant, Instant)>,
}

struct Stats {
    latency: Histogram<u64>,
    lateness: Histogram<u64>,
    ok: u64,
    /// Slots skipped because the previous heartbeat was still out or the generator was late
    /// by a whole period.
    missed_slots: u64,
    errors: BTreeMap<String, u64>,
    /// Long polls: when each participant heard each piece of news (a state, and which coming
    /// of it).
    news: BTreeMap<String, Vec<Instant>>,
    /// Plain mode, per second of the window (by slot): heartbeats, the slowest, and how many
    /// took over 20 ms; a stall shows as a second of its own.
    timeline: Vec<(u64, u64, u64)>,
    /// Long polls answered unchanged when their wait ran out.
    held_out: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            lateness: new_histogram(),
            ok: 0,
            missed_slots: 0,
            errors: BTreeMap::new(),
            news: BTreeMap::new(),
            timeline: Vec::new(),
            held_out: 0,
        }
    }
}

impl Shared {
    fn in_window(&self, at: Instant) -> bool {
        self.window
            .get()
            .is_some_and(|(start, end)| at >= *start && at < *end)
    }

    fn error(&self, kind: String) {
        *self
            .stats
            .lock()
            .expect("stats lock")
            .errors
            .entry(kind)
            .or_default() += 1;
    }
}

/// The connection is driven by the task that sends on it, only while a request is out: no
/// second task to wake per heartbeat (the generator's CPU counts against the same two cores).
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    conn: Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

#[derive(Debug)]
enum CallError {
    /// The connection is unusable: open a new one.
    Broken(String),
    /// An answer came, but not the expected one.
    Answer(String),
}

impl CallError {
    fn kind(&self) -> String {
        match self {
            CallError::Broken(k) | CallError::Answer(k) => k.clone(),
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<Connection, CallError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| CallError::Broken(format!("connect: {:?}", e.kind())))?;
    // Small requests, one at a time: Nagle would only add delay.
    stream
        .set_nodelay(true)
        .map_err(|e| CallError::Broken(format!("nodelay: {:?}", e.kind())))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::Broken(format!("handshake: {e}")))?;
    Ok(Connection {
        sender,
        conn: Box::pin(conn),
    })
}

fn hyper_error_kind(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        "send: connection closed before the answer".into()
    } else if e.is_closed() || e.is_canceled() {
        "send: connection closed".into()
    } else if e.is_timeout() {
        "send: timeout".into()
    } else {
        format!("send: {e}")
    }
}

impl Connection {
    /// One POST with an empty body; the status and the whole body, or why not.
    async fn post(
        &mut self,
        path: &str,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let mut request = Request::post(path).header(header::HOST, "coordinator");
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| CallError::Answer(format!("request: {e}")))?;
        let Self { sender, conn } = self;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| CallError::Broken(hyper_error_kind(&e)))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| CallError::Broken(hyper_error_kind(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Broken(format!("body: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let driven = async {
            tokio::select! {
                result = exchange => result,
                ended = conn.as_mut() => Err(CallError::Broken(match ended {
                    Ok(()) => "send: connection closed".into(),
                    Err(e) => hyper_error_kind(&e),
                })),
            }
        };
        match tokio::time::timeout(timeout, driven).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Broken("timeout".into())),
        }
    }
}

#[derive(Deserialize)]
struct Joined {
    participant_id: String,
    secret: String,
}

#[derive(Deserialize)]
struct Heartbeat {
    action: String,
    state: String,
}

struct Participant {
    index: usize,
    id: String,
    secret: String,
    connection: Option<Connection>,
}

struct JoinTimes {
    connect: Histogram<u64>,
    join: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

async fn join_one(
    addr: SocketAddr,
    index: usize,
    join_secret: Option<&str>,
    timeout: Duration,
) -> Result<(Participant, Duration, Duration), CallError> {
    let started = Instant::now();
    let mut connection = connect(addr).await?;
    let connected = Instant::now();
    let (status, body) = connection
        .post("/v1/participants", join_secret, timeout)
        .await?;
    let answered = Instant::now();
    if status != StatusCode::CREATED {
        return Err(CallError::Answer(format!(
            "join: status {}",
            status.as_u16()
        )));
    }
    let joined: Joined = serde_json::from_slice(&body)
        .map_err(|_| CallError::Answer("join: unexpected body".into()))?;
    Ok((
        Participant {
            index,
            id: joined.participant_id,
            secret: joined.secret,
            connection: Some(connection),
        },
        connected - started,
        answered - connected,
    ))
}

/// One heartbeat on the participant's connection (a new one if the last broke).
async fn heartbeat(
    participant: &mut Participant,
    addr: SocketAddr,
    query: &str,
    timeout: Duration,
) -> Result<Heartbeat, CallError> {
    let connection = match participant.connection.as_mut() {
        Some(c) => c,
        None => participant.connection.insert(connect(addr).await?),
    };
    let path = format!("/v1/participants/{}/heartbeat{query}", participant.id);
    let result = connection
        .post(&path, Some(&participant.secret), timeout)
        .await;
    let (status, body) = match result {
        Ok(answer) => answer,
        Err(e) => {
            participant.connection = None;
            return Err(e);
        }
    };
    if status != StatusCode::OK {
        return Err(CallError::Answer(format!(
            "heartbeat: status {}",
            status.as_u16()
        )));
    }
    let answer: Heartbeat = serde_json::from_slice(&body)
        .map_err(|_| CallError::Answer("heartbeat: unexpected body".into()))?;
    if answer.action == "rejected" {
        return Err(CallError::Answer("heartbeat: rejected".into()));
    }
    Ok(answer)
}

/// Plain mode: one heartbeat per slot, slot k of participant i at start + (k + i/N) × period.
async fn plain_loop(
    mut participant: Participant,
    addr: SocketAddr,
    shared: Arc<Shared>,
    epoch: Instant,
    n: usize,
    period: Duration,
    timeout: Duration,
) -> Participant {
    let offset = period.mul_f64(participant.index as f64 / n as f64);
    let slot_at = |k: u64| epoch + offset + period * u32::try_from(k).unwrap_or(u32::MAX);
    // The first slot after joining.
    let since_epoch = Instant::now().saturating_duration_since(epoch + offset);
    let mut k = since_epoch.as_nanos().div_ceil(period.as_nanos()) as u64;
    loop {
        let slot = slot_at(k);
        if let Some((_, end)) = shared.window.get()
            && slot >= *end
        {
            return participant;
        }
        tokio::time::sleep_until(slot).await;
        let sent = Instant::now();
        let result = heartbeat(&mut participant, addr, "", timeout).await;
        let answered = Instant::now();
        if shared.in_window(slot) {
            let mut stats = shared.stats.lock().expect("stats lock");
            stats.lateness.saturating_record(micros(sent - slot));
            match result {
                Ok(_) => {
                    stats.ok += 1;
                    let took = micros(answered - sent);
                    stats.latency.saturating_record(took);
                    if let Some((start, _)) = shared.window.get() {
                        let second = (slot - *start).as_secs() as usize;
                        if stats.timeline.len() <= second {
                            stats.timeline.resize(second + 1, (0, 0, 0));
                        }
                        let entry = &mut stats.timeline[second];
                        entry.0 += 1;
                        entry.1 = entry.1.max(took);
                        entry.2 += u64::from(took > 20_000);
                    }
                }
                Err(e) => *stats.errors.entry(e.kind()).or_default() += 1,
            }
        }
        // The next slot that is still ahead; any passed over are counted, not sent late.
        let next = answered.saturating_duration_since(epoch + offset);
        let next_k = (next.as_nanos() / period.as_nanos()) as u64 + 1;
        if next_k > k + 1 {
            let skipped = (k + 1..next_k)
                .filter(|&j| shared.in_window(slot_at(j)))
                .count();
            shared.stats.lock().expect("stats lock").missed_slots += skipped as u64;
        }
        k = next_k.max(k + 1);
    }
}

/// Long-poll mode: ask again as soon as an answer comes, as the SDK does.
async fn long_poll_loop(
    mut participant: Participant,
    addr: SocketAddr,
    shared: Arc<Shared>,
    wait_secs: f64,
    timeout: Duration,
) -> Participant {
    let mut since: Option<String> = None;
    // A state can come back (standby after each failed attempt): its n-th coming is its own
    // piece of news, heard by every participant as its n-th.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        if let Some((_, end)) = shared.window.get()
            && Instant::now() >= *end
        {
            return participant;
        }
        let query = match &since {
            Some(state) => format!("?wait_secs={wait_secs}&since={state}"),
            None => format!("?wait_secs={wait_secs}"),
        };
        let result = heartbeat(&mut participant, addr, &query, timeout).await;
        let answered = Instant::now();
        match result {
            Ok(answer) => {
                let mut stats = shared.stats.lock().expect("stats lock");
                stats.ok += 1;
                if since.as_deref() == Some(answer.state.as_str()) {
                    stats.held_out += 1;
                } else if since.is_some() {
                    let nth = seen.entry(answer.state.clone()).or_default();
                    *nth += 1;
                    stats
                        .news
                        .entry(format!("{} #{nth}", answer.state))
                        .or_default()
                        .push(answered);
                }
                since = Some(answer.state);
            }
            Err(e) => {
                shared.error(e.kind());
                // Not a busy loop against a coordinator that refuses.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// CPU seconds (user + system) this process has used so far.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run(args: Args) -> serde_json::Value {
    let shared = Arc::new(Shared::default());
    let period = Duration::from_secs_f64(args.period_secs);
    let timeout = Duration::from_secs_f64(args.request_timeout_secs);
    let poll_timeout = timeout + Duration::from_secs_f64(args.wait_secs.min(30.0));
    let n = args.participants;
    let epoch = Instant::now();

    // Joining: each participant starts heartbeating as soon as it has joined, as the SDK does
    // (the first ones would otherwise be dropped as silent while the rest join).
    let join_started = Instant::now();
    let cpu_before_join = own_cpu_secs();
    let mut times = JoinTimes {
        connect: new_histogram(),
        join: new_histogram(),
        errors: BTreeMap::new(),
    };
    let join_secret = args.join_secret.clone();
    let mut joins = futures::stream::iter(0..n)
        .map(|index| {
            let secret = join_secret.clone();
            async move { join_one(args.addr, index, secret.as_deref(), timeout).await }
        })
        .buffer_unordered(args.join_concurrency.max(1));
    let mut tasks = Vec::with_capacity(n);
    while let Some(joined) = joins.next().await {
        match joined {
            Ok((participant, connect_time, join_time)) => {
                times.connect.saturating_record(micros(connect_time));
                times.join.saturating_record(micros(join_time));
                let shared = shared.clone();
                let addr = args.addr;
                tasks.push(match args.mode {
                    Mode::Plain => tokio::spawn(plain_loop(
                        participant,
                        addr,
                        shared,
                        epoch,
                        n,
                        period,
                        timeout,
                    )),
                    Mode::LongPoll => tokio::spawn(long_poll_loop(
                        participant,
                        addr,
                        shared,
                        args.wait_secs,
                        poll_timeout,
                    )),
                });
            }
            Err(e) => *times.errors.entry(e.kind()).or_default() += 1,
        }
    }
    let join_secs = join_started.elapsed().as_secs_f64();
    let join_cpu = own_cpu_secs() - cpu_before_join;
    let joined = tasks.len();
    let joins_done = Instant::now();

    let window_start = Instant::now() + Duration::from_secs_f64(args.warmup_secs);
    let window_end = window_start + Duration::from_secs_f64(args.duration_secs);
    let _ = shared.window.set((window_start, window_end));
    tokio::time::sleep_until(window_start).await;
    let cpu_start = own_cpu_secs();
    say("measuring");
    tokio::time::sleep_until(window_end).await;
    let cpu_end = own_cpu_secs();
    say("measured");
    // Every loop ends at its first slot past the window, or when its poll is answered.
    let grace = window_end + poll_timeout + Duration::from_secs(1);
    let mut unfinished = 0;
    // Their connections are closed only once every loop has ended: closing each as its
    // participant finished would put 10,000 closes into the window's last second.
    let mut finished = Vec::with_capacity(tasks.len());
    for task in tasks {
        match tokio::time::timeout_at(grace, task).await {
            Ok(Ok(participant)) => finished.push(participant),
            _ => unfinished += 1,
        }
    }
    drop(finished);

    let stats = shared.stats.lock().expect("stats lock");
    let window_secs = args.duration_secs;
    let mut report = json!({
        "mode": match args.mode { Mode::Plain => "plain", Mode::LongPoll => "long-poll" },
        "participants": n,
        "joined": joined,
        "join": {
            "secs": join_secs,
            "per_sec": joined as f64 / join_secs,
            "concurrency": args.join_concurrency,
            "connect": summary(&times.connect),
            "latency": summary(&times.join),
            "errors": times.errors,
            "generator_cpu_secs": join_cpu,
        },
        "window_secs": window_secs,
        "warmup_secs": args.warmup_secs,
        "heartbeats_ok": stats.ok,
        "heartbeats_per_sec": stats.ok as f64 / window_secs,
        "errors": stats.errors,
        "unfinished_at_end": unfinished,
        "generator_cpu_percent": 100.0 * (cpu_end - cpu_start) / window_secs,
    });
    match args.mode {
        Mode::Plain => {
            let expected = (n as f64 * window_secs / args.period_secs).round();
            report["heartbeat"] = summary(&stats.latency);
            report["lateness"] = summary(&stats.lateness);
            report["missed_slots"] = json!(stats.missed_slots);
            report["heartbeats_expected"] = json!(expected);
            report["timeline"] = json!(
                stats
                    .timeline
                    .iter()
                    .map(|(n, max, slow)| json!({
                        "heartbeats": n,
                        "max_ms": *max as f64 / 1000.0,
                        "over_20ms": slow,
                    }))
                    .collect::<Vec<_>>()
            );
        }
        Mode::LongPoll => {
            report["held_polls_answered_unchanged"] = json!(stats.held_out);
            report["wait_secs"] = json!(args.wait_secs);
            let mut news: Vec<_> = stats
                .news
                .iter()
                .map(|(state, heard)| {
                    let first = heard.iter().min().copied().unwrap_or(joins_done);
                    let mut spread = new_histogram();
                    for at in heard {
                        spread.saturating_record(micros(*at - first));
                    }
                    (
                        first,
                        json!({
                            "state": state,
                            "heard_by": heard.len(),
                            "first_heard_secs_after_joins": first
                                .checked_duration_since(joins_done)
                                .map(|d| d.as_secs_f64()),
                            "after_first": summary(&spread),
                        }),
                    )
                })
                .collect();
            news.sort_by_key(|(first, _)| *first);
            report["news"] = json!(news.into_iter().map(|(_, n)| n).collect::<Vec<_>>());
        }
    }
    report
}

fn main() {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    runtime.worker_threads(args.threads.max(1));
    let runtime = runtime.build().expect("a tokio runtime");
    let json_out = args.json_out.clone();
    let report = runtime.block_on(run(args));
    let text = serde_json::to_string_pretty(&report).expect("a JSON report");
    if let Some(path) = json_out {
        std::fs::write(&path, &text).expect("the report file is writable");
    }
    say(&text);
}
