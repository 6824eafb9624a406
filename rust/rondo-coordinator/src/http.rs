//! The coordinator's HTTP API for participants (see `docs/wire-format.md`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;

use rondo_core::federation::{
    Action, EvaluationError, EvaluationReport, FederationError, Joining, PhaseName,
};
use rondo_net::api::{self, ApiError, bearer_token};
use serde::Deserialize;
use serde_json::json;

use crate::config::JoinRate;
use crate::service::Coordinator;
use crate::status::FederationStatus;

const OPENAPI: &str = include_str!("../../../docs/openapi/coordinator.json");

/// The live status page (`GET /`) and what it loads: served as they are, no build step.
const STATUS_PAGE: &str = include_str!("page/index.html");
const STATUS_JS: &str = include_str!("page/status.js");
const STATUS_CSS: &str = include_str!("page/status.css");
/// The page loads only its own script and style and talks only to this coordinator: a name or
/// metric a participant sent that slipped into markup still could not run or load anything.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Control-plane bodies are tiny; anything bigger is a mistake or an attack.
const MAX_JSON_BODY: usize = 64 * 1024;

/// What the API allows its clients beyond the connection limits of `serve_http`.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Joins per source address; `None`: no limit.
    pub join_rate: Option<JoinRate>,
    /// How long a request with a JSON body may take, its body included (`api.header_timeout_secs`):
    /// a client trickling a body must not hold a task for long.
    pub request_timeout: Duration,
}

pub fn router(coordinator: Arc<Coordinator>, limits: ApiLimits) -> Router {
    let join_limit = limits.join_rate.map(|rate| {
        axum::middleware::from_fn_with_state(Arc::new(JoinLimiter::new(rate)), limit_joins)
    });
    let timeout = limits.request_timeout;
    let with_bodies = Router::new()
        .route(
            "/v1/participants",
            post(join).route_layer(tower::util::option_layer(join_limit)),
        )
        .route("/v1/participants/{id}/start_training", post(start_training))
        .route("/v1/participants/{id}/evaluation", post(evaluation))
        .route_layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    move |_: tower::BoxError| async move {
                        api::closing(ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            "request_timeout",
                            format!(
                                "the request was not received and answered within {} s \
                                 (api.header_timeout_secs)",
                                timeout.as_secs_f64()
                            ),
                        ))
                    },
                ))
                .timeout(timeout),
        );
    let routes = Router::new()
        .route("/", get(status_page))
        .route("/static/status.js", get(status_js))
        .route("/static/status.css", get(status_css))
        .merge(with_bodies)
        .route("/v1/participants/{id}/heartbeat", post(heartbeat))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .route("/v1/history.csv", get(history_csv))
        // The global models live on the aggregator: these send the client there.
        .route("/v1/model", get(to_aggregator))
        .route("/v1/models", get(to_aggregator))
        .route("/v1/rounds/{round}/model", get(to_aggregator))
        .route("/v1/rounds/{round}/manifest", get(to_aggregator))
        .route("/metrics", get(metrics));
    let refused = coordinator.metrics.refused.clone();
    api::with_common_routes(routes, OPENAPI)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(api::reject_oversized(MAX_JSON_BODY as u64, "invalid_body"))
        // Outermost, so that refusals by the layers above are counted too.
        .layer(axum::middleware::map_response_with_state(
            refused,
            api::count_refused,
        ))
        .with_state(coordinator)
}

/// Joins per source address: a token bucket per address (governor's GCRA), forgotten once
/// full again.
struct JoinLimiter {
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    rate: JoinRate,
    /// Checks since the buckets of quiet addresses were last dropped.
    checks: std::sync::atomic::AtomicU32,
}

/// Every so many checks, the addresses whose bucket is full again are forgotten, so that the
/// limiter's memory follows the addresses joining now, not all that ever did.
const FORGET_QUIET_ADDRESSES_EVERY: u32 = 1024;

impl JoinLimiter {
    fn new(rate: JoinRate) -> Self {
        let period = Duration::from_secs_f64(1.0 / rate.per_second);
        // Both are checked in the config: a period of at least a microsecond, a burst of one or
        // more.
        let quota = governor::Quota::with_period(period)
            .expect("a positive period")
            .allow_burst(std::num::NonZeroU32::new(rate.burst).expect("a burst of one or more"));
        Self {
            limiter: governor::RateLimiter::keyed(quota),
            rate,
            checks: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// How long `address` must wait before its next join, if it must.
    fn check(&self, address: std::net::IpAddr) -> Result<(), Duration> {
        use governor::clock::Clock;
        let checks = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if checks % FORGET_QUIET_ADDRESSES_EVERY == FORGET_QUIET_ADDRESSES_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&address).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }
}

/// Refuses a join beyond its address's rate with 429 `too_many_joins` and `Retry-After`,
/// before the request is read: nothing changes.
async fn limit_joins(
    State(limiter): State<Arc<JoinLimiter>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(address) = peer
        && let Err(wait) = limiter.check(address)
    {
        let JoinRate { per_second, burst } = limiter.rate;
        let mut refused = api::closing(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_joins",
            format!(
                "more joins from this address than limits.joins_per_second_per_address \
                 ({per_second}/s, bursts of {burst}); try again in {:.1} s",
                wait.as_secs_f64()
            ),
        ));
        let retry_after = wait.as_secs_f64().ceil().max(1.0).to_string();
        if let Ok(value) = axum::http::HeaderValue::from_str(&retry_after) {
            refused
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, value);
        }
        return refused;
    }
    next.run(request).await
}

fn federation_error(err: FederationError) -> ApiError {
    let message = err.to_string();
    match err {
        FederationError::UnknownParticipant(_) => {
            ApiError::not_found("unknown_participant", message)
        }
        FederationError::InvalidSecret(_) => ApiError::unauthorized("invalid_secret", message),
        FederationError::NotSelected(_) => ApiError::conflict("not_selected", message),
        // `Coordinator::join` draws ids until one is free; no request can reach this.
        FederationError::AlreadyJoined(_) => ApiError::conflict("already_joined", message),
        FederationError::MissingJoinSecret => {
            ApiError::unauthorized("missing_join_secret", message)
        }
        FederationError::InvalidJoinSecret => {
            ApiError::unauthorized("invalid_join_secret", message)
        }
        FederationError::NotAllowed(_) => {
            ApiError::new(StatusCode::FORBIDDEN, "not_allowed", message)
        }
        FederationError::CredentialExpired(_) => {
            ApiError::unauthorized("credential_expired", message)
        }
        FederationError::Full(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "federation_full", message)
        }
    }
}

/// The body of `POST /v1/participants`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub name: Option<String>,
    /// Whether it can score a model on its data (federated evaluation).
    #[serde(default)]
    pub can_evaluate: bool,
}

/// Longest participant name a join may give, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 256;

impl JoinRequest {
    /// The join body as sent (blank: no name), checked; a plain function so that the fuzz
    /// target (`fuzz/fuzz_targets/json_bodies.rs`) reads bodies exactly as the handler does.
    pub fn from_body(body: &[u8]) -> Result<Self, ApiError> {
        let request: JoinRequest = if body.iter().all(u8::is_ascii_whitespace) {
            JoinRequest::default()
        } else {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("expected {{\"name\": string, \"can_evaluate\": boolean}}: {e}"),
                )
            })?
        };
        if request
            .name
            .as_ref()
            .is_some_and(|n| n.len() > MAX_NAME_BYTES)
        {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("`name` must be at most {MAX_NAME_BYTES} bytes"),
            ));
        }
        Ok(request)
    }
}

async fn join(
    State(coordinator): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })?;
    let request = JoinRequest::from_body(&body)?;
    // The join secret, when the federation has one, comes as the bearer token.
    let join_secret = bearer_token(&headers, "missing_join_secret")
        .ok()
        .map(str::to_string);
    let joined = coordinator.join(Joining {
        name: request.name.clone(),
        can_evaluate: request.can_evaluate,
        join_secret,
    });
    let (participant_id, secret) = joined.map_err(|refused| {
        tracing::info!(name = ?request.name, %refused, "join refused");
        federation_error(refused)
    })?;
    // Its credentials must outlive a crash of the coordinator before it learns them.
    coordinator.durable().await.map_err(store_unavailable)?;
    coordinator.metrics.joins.inc();
    tracing::info!(%participant_id, name = ?request.name, "participant joined");
    coordinator.wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "participant_id": participant_id,
            "secret": secret,
            "heartbeat_period_secs": coordinator.heartbeat_period_secs,
        })),
    )
        .into_response())
}

/// The query of `POST /v1/participants/{id}/heartbeat`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatQuery {
    /// Long-poll: when the answer would equal `since`, wait up to this long for it to change.
    pub wait_secs: Option<f64>,
    /// The `state` of the previous answer.
    pub since: Option<String>,
}

/// The longest a heartbeat is held, whatever `wait_secs` asks.
pub const MAX_HEARTBEAT_WAIT: Duration = Duration::from_secs(30);

impl HeartbeatQuery {
    /// How long to hold the heartbeat for a change: `wait_secs`, checked, within
    /// [`MAX_HEARTBEAT_WAIT`] and half the heartbeat timeout, so that the participant never
    /// looks silent. A plain function for the fuzz target, like [`JoinRequest::from_body`].
    pub fn wait(&self, heartbeat_timeout: Duration) -> Result<Duration, ApiError> {
        let wait_secs = self.wait_secs.unwrap_or(0.0);
        if !(wait_secs.is_finite() && wait_secs >= 0.0) {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`wait_secs` must be a non-negative number of seconds",
            ));
        }
        Ok(
            Duration::from_secs_f64(wait_secs.min(MAX_HEARTBEAT_WAIT.as_secs_f64()))
                .min(heartbeat_timeout / 2),
        )
    }
}

/// A short token for an action: equal tokens mean "nothing new for this participant".
fn action_state(action: &Action) -> String {
    match action {
        Action::Standby => "standby".into(),
        Action::Train { round, attempt } => format!("train:{round}:{attempt}"),
        Action::Evaluate { round } => format!("evaluate:{round}"),
        Action::Finish => "finish".into(),
        Action::Rejected { .. } => "rejected".into(),
    }
}

async fn heartbeat(
    State(coordinator): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HeartbeatQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
    let heartbeat_timeout = coordinator.federation().settings().heartbeat_timeout;
    let wait = query.wait(heartbeat_timeout)?;
    // Owned, and the headers dropped: their values are slices of the connection's read
    // buffer, and held through a long poll they would keep that buffer (8 KiB) alive beside
    // the one hyper reads into while the answer waits, ~80 MB more at 10,000 held heartbeats.
    let secret = bearer_token(&headers, "missing_secret")?.to_string();
    drop(headers);
    // Subscribe before looking, so that a change between the look and the wait is not missed.
    let mut changes = coordinator.subscribe_changes();
    let deadline = tokio::time::Instant::now() + wait;
    let action = loop {
        let action = coordinator
            .federation()
            .heartbeat(&id, &secret, coordinator.now())
            .map_err(federation_error)?;
        if query.since.as_deref() != Some(action_state(&action).as_str()) {
            break action;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out (or the coordinator is shutting down): answer what we have.
            _ => break action,
        }
    };
    coordinator.touch();
    let state = action_state(&action);
    let (name, round, attempt, reason) = match action {
        Action::Standby => ("standby", None, None, None),
        Action::Train { round, attempt } => ("train", Some(round), Some(attempt), None),
        Action::Evaluate { round } => ("evaluate", Some(round), None, None),
        Action::Finish => ("finish", None, None, None),
        Action::Rejected { reason } => ("rejected", None, None, Some(reason)),
    };
    coordinator
        .metrics
        .heartbeats
        .with_label_values(&[name])
        .inc();
    let mut answer = json!({
        "action": name,
        "round": round,
        "attempt": attempt,
        "reason": reason,
        "state": state,
    });
    if name == "evaluate" {
        // The final model: nothing replaces it any more, so the latest is the one meant.
        let base = coordinator.aggregator_url().unwrap_or_default();
        answer["model_url"] = json!(format!("{base}/v1/model"));
    }
    Ok(Json(answer))
}

async fn start_training(
    State(coordinator): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = bearer_token(&headers, "missing_secret")?;
    let grant = coordinator
        .federation()
        .start_training(&id, secret, coordinator.now())
        .map_err(federation_error)?;
    coordinator.touch();
    let base = coordinator.aggregator_url().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "aggregator_unavailable",
            "the aggregator is not attached yet",
        )
    })?;
    let round = grant.round;
    let model_url = grant
        .has_global_model
        .then(|| format!("{base}/v1/rounds/{round}/model"));
    Ok(Json(json!({
        "round": round,
        "model_url": model_url,
        "upload_url": format!("{base}/v1/rounds/{round}/update"),
        "token": grant.token,
        "evaluate_round": grant.evaluate_round,
    })))
}

/// The body of `POST /v1/participants/{id}/evaluation`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationBody {
    pub round: u32,
    pub loss: f64,
    pub n_samples: u64,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

impl EvaluationBody {
    /// The evaluation body as sent; its values are checked by the federation
    /// (`Federation::evaluation_reported`). A plain function for the fuzz target.
    pub fn from_body(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!(
                    "expected {{\"round\": integer, \"loss\": number, \"n_samples\": integer, \
                     \"metrics\": {{name: number}}}}: {e}"
                ),
            )
        })
    }
}

/// A participant's score of the model of a round it was asked to evaluate.
async fn evaluation(
    State(coordinator): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = bearer_token(&headers, "missing_secret")?;
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })?;
    let request = EvaluationBody::from_body(&body)?;
    let report = EvaluationReport {
        participant_id: id.clone(),
        loss: request.loss,
        n_samples: request.n_samples,
        metrics: request.metrics,
    };
    let now = coordinator.now();
    let (summary, finished) = {
        let mut federation = coordinator.federation();
        let summary = federation
            .evaluation_reported(&id, secret, report, request.round, now)
            .map_err(|err| match err {
                EvaluationError::Federation(err) => federation_error(err),
                EvaluationError::NotAsked(..) => ApiError::conflict("not_asked", err.to_string()),
                EvaluationError::AlreadyReported(..) => {
                    ApiError::conflict("already_reported", err.to_string())
                }
                EvaluationError::Invalid(message) => ApiError::bad_request("invalid_body", message),
            })?;
        // Under the lock: two reports set the gauges in the order their summaries were made,
        // so the gauge ends on the summary of every report, not on whichever thread ran last.
        coordinator
            .metrics
            .observe_evaluation(request.round, &summary);
        (summary, federation.phase_name() == PhaseName::Finished)
    };
    // A report answered 2xx is not sent again.
    coordinator.durable().await.map_err(store_unavailable)?;
    if finished {
        // Its held heartbeat should hear "finish" now, not when the hold runs out.
        coordinator.changed();
    }
    tracing::info!(
        participant = %id,
        round = request.round,
        loss = summary.loss,
        reports = summary.participants,
        "evaluation reported"
    );
    Ok(Json(
        json!({ "round": request.round, "evaluation": summary }),
    ))
}

/// The state store did not confirm a change in time: the participant tries again later.
fn store_unavailable(message: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        message,
    )
}

/// Whether `raw`, the `{round}` of a model route's path, is a round number as the aggregator
/// reads one: canonical decimal (no sign, no leading zero) within `u32`.
pub fn is_round_number(raw: &str) -> bool {
    raw.parse::<u32>().ok().map(|r| r.to_string()).as_deref() == Some(raw)
}

/// A `307 Temporary Redirect` to the same path on the aggregator's public URL (learned when
/// the link attaches), for the routes of models, which the coordinator never holds. The round
/// in a path must be canonical decimal, as the aggregator wants it, so that the redirect never
/// sends a client on with a path the aggregator would refuse.
async fn to_aggregator(
    State(coordinator): State<Arc<Coordinator>>,
    OriginalUri(uri): OriginalUri,
) -> Result<Response, ApiError> {
    let path = uri.path();
    if let Some(raw) = path
        .strip_prefix("/v1/rounds/")
        .and_then(|p| p.split('/').next())
        && !is_round_number(raw)
    {
        return Err(ApiError::bad_request(
            "invalid_round",
            format!("`{raw}` is not a round number (0, or digits without a leading zero)"),
        ));
    }
    let base = coordinator.aggregator_url().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "aggregator_unavailable",
            "the aggregator is not attached yet; try again shortly",
        )
    })?;
    let location = format!("{base}{path}");
    let value = axum::http::HeaderValue::from_str(&location).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "aggregator_unavailable",
            "the aggregator's public URL cannot be sent as a Location",
        )
    })?;
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(axum::http::header::LOCATION, value)],
        Json(json!({ "location": location })),
    )
        .into_response())
}

/// Every closed round attempt, one object each.
async fn history(State(coordinator): State<Arc<Coordinator>>) -> Json<serde_json::Value> {
    let federation = coordinator.federation();
    Json(json!({ "rounds": federation.round_summaries() }))
}

/// [`history`] as CSV: one row per attempt; a column per training metric (`train_<name>`)
/// and evaluation metric (`eval_<name>`) any round reported.
async fn history_csv(State(coordinator): State<Arc<Coordinator>>) -> Response {
    let text = crate::history::csv(coordinator.federation().round_summaries());
    (
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn status(State(coordinator): State<Arc<Coordinator>>) -> Json<serde_json::Value> {
    let status = FederationStatus::of(&coordinator.federation(), coordinator.now());
    let mut value = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    value["aggregator_url"] = json!(coordinator.aggregator_url());
    value["aggregator"] = json!(coordinator.aggregator_health());
    Json(value)
}

async fn metrics(State(coordinator): State<Arc<Coordinator>>) -> Response {
    // The gauges are read off the federation when scraped, not kept up to date on every tick.
    let health = coordinator.aggregator_health();
    coordinator
        .metrics
        .observe(&coordinator.federation(), &health);
    api::metrics_response(&coordinator.metrics.registry)
}

fn page_asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (axum::http::header::CONTENT_SECURITY_POLICY, STATUS_PAGE_CSP),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Small, and they change with the binary: always asked again, never stale.
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn status_page() -> Response {
    page_asset("text/html; charset=utf-8", STATUS_PAGE)
}

async fn status_js() -> Response {
    page_asset("text/javascript; charset=utf-8", STATUS_JS)
}

async fn status_css() -> Response {
    page_asset("text/css; charset=utf-8", STATUS_CSS)
}
