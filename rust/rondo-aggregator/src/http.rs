//! The aggregator's HTTP API: model downloads and update uploads (see `docs/wire-format.md`),
//! and the model store's kept rounds (`GET /v1/models`, a round's manifest and model).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use rondo_net::api::{self, ApiError, bearer_token};
use serde_json::json;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::models::{ModelStore, ReadError};
use crate::rounds::{CommitError, Grant, GrantError};
use crate::service::{Aggregator, Commit};
use crate::staging::STAGING_UNIT;
use crate::wire::{self, BodyError, UploadError};

const OPENAPI: &str = include_str!("../../../docs/openapi/aggregator.json");

pub fn router(aggregator: Arc<Aggregator>) -> Router {
    let max_uploads = aggregator.upload.max_in_flight;
    let routes = Router::new()
        .route("/v1/rounds/{round}/model", get(download_round_model))
        .route("/v1/rounds/{round}/manifest", get(round_manifest))
        .route("/v1/models", get(stored_models))
        // An upload makes hyper grow the connection's read buffer to its maximum, and a
        // kept-alive connection keeps it: with a hundred participants that is more memory than
        // the model. Uploads happen once a round, so their connections are closed instead.
        .route(
            "/v1/rounds/{round}/update",
            post(upload_update)
                // At most so many uploads at once; one more is refused at once, before its
                // body is read (tower's concurrency limit, shedding instead of queueing, so that
                // a flood is refused rather than held). Outside the size check, so that an
                // upload refused for its size does not take a place.
                .route_layer(
                    tower::ServiceBuilder::new()
                        .layer(axum::error_handling::HandleErrorLayer::new(
                            move |_: tower::BoxError| async move { too_many_uploads(max_uploads) },
                        ))
                        .load_shed()
                        .concurrency_limit(max_uploads),
                )
                .route_layer(api::reject_oversized(
                    aggregator.max_body_bytes,
                    "body_too_large",
                ))
                .layer(SetResponseHeaderLayer::overriding(
                    header::CONNECTION,
                    HeaderValue::from_static("close"),
                )),
        )
        .route("/v1/model", get(download_latest_model))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics));
    let refused = aggregator.metrics.refused.clone();
    api::with_common_routes(routes, OPENAPI)
        // Uploads are streamed and limited by `api.max_body_bytes` in `wire::read_update`.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response_with_state(
            refused,
            api::count_refused,
        ))
        .with_state(aggregator)
}

/// The answer to an upload beyond `api.max_uploads_in_flight` (see [`router`]).
fn too_many_uploads(max: usize) -> Response {
    let mut refused = api::closing(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_uploads",
        format!(
            "{max} uploads are being received, the limit (api.max_uploads_in_flight); send it \
             again shortly"
        ),
    ));
    refused
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    refused
}

fn grant_error(err: GrantError) -> ApiError {
    match err {
        GrantError::InvalidToken => {
            ApiError::unauthorized("invalid_token", "the token is not valid for any open round")
        }
        GrantError::TokenExpired => ApiError::unauthorized(
            "token_expired",
            "the token belongs to a round that has closed",
        ),
        GrantError::WrongRound { token_round } => ApiError::conflict(
            "wrong_round",
            format!("the token is for round {token_round}, not the round in the path"),
        ),
        GrantError::Duplicate => ApiError::conflict(
            "duplicate_update",
            "this participant's update was already accepted in this round",
        ),
        GrantError::NotYours { claimed } => ApiError::new(
            StatusCode::FORBIDDEN,
            "token_not_yours",
            format!(
                "the token was issued to another participant than {claimed:?} \
                 ({PARTICIPANT_HEADER})"
            ),
        ),
        GrantError::InProgress => ApiError::conflict(
            "upload_in_progress",
            "another upload from this participant is still being received",
        ),
    }
}

fn commit_error(err: CommitError) -> ApiError {
    let message = err.to_string();
    match err {
        CommitError::RoundClosed => ApiError::unauthorized(err.code(), message),
        CommitError::Duplicate => ApiError::conflict(err.code(), message),
        CommitError::Mismatch(_) => ApiError::bad_request(err.code(), message),
        CommitError::Unsaved(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, err.code(), message)
        }
    }
}

/// The `{round}` of `/v1/rounds/{round}/...`, read from the path as sent: `Path` would
/// percent-decode it first, and `%31` would pass for `1`.
fn round_param(uri: &axum::http::Uri) -> Result<u32, ApiError> {
    let raw = uri.path().split('/').nth(3).unwrap_or_default();
    let invalid = || {
        ApiError::bad_request(
            "invalid_round",
            format!("`{raw}` is not a round number (0, or digits without a leading zero)"),
        )
    };
    if !wire::is_canonical_decimal(raw) {
        return Err(invalid());
    }
    raw.parse().map_err(|_| invalid())
}

/// A download is handed to hyper in slices of this size, so that its progress is seen: hyper
/// asks for the next slice once it has written the previous one (or most of it).
const DOWNLOAD_SLICE: usize = 256 << 10;

/// A model file as a response body that counts itself: the bytes handed to the connection and,
/// once the last slice is handed over, the download's duration; dropped before that (the
/// client went away), an aborted download. One atomic add per slice, and no copy: slices share
/// the file's memory. The size is exact, so hyper still sends a `Content-Length`.
struct Download {
    file: bytes::Bytes,
    offset: usize,
    started: Instant,
    aggregator: Arc<Aggregator>,
}

impl hyper::body::Body for Download {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.offset >= this.file.len() {
            return std::task::Poll::Ready(None);
        }
        let end = (this.offset + DOWNLOAD_SLICE).min(this.file.len());
        let slice = this.file.slice(this.offset..end);
        let metrics = &this.aggregator.metrics;
        metrics.download_bytes.inc_by((end - this.offset) as u64);
        this.offset = end;
        // hyper asks no further once `is_end_stream` says so: the last slice is the end.
        if end == this.file.len() {
            metrics
                .download_seconds
                .observe(this.started.elapsed().as_secs_f64());
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.file.len()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.file.len().saturating_sub(self.offset) as u64)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if self.offset < self.file.len() {
            self.aggregator.metrics.downloads_aborted.inc();
        }
    }
}

fn model_response(aggregator: &Arc<Aggregator>, file: bytes::Bytes, round: u32) -> Response {
    let body = Download {
        file,
        offset: 0,
        started: Instant::now(),
        aggregator: aggregator.clone(),
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-rondo-round"),
                round.to_string(),
            ),
        ],
        Body::new(body),
    )
        .into_response()
}

/// The model store, or the answer that there is none.
fn model_store(aggregator: &Aggregator) -> Result<&Arc<ModelStore>, ApiError> {
    aggregator.model_store.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "no_model_store",
            "this aggregator keeps no models (store.data_dir is not set)",
        )
    })
}

fn not_stored(store: &ModelStore, round: u32) -> ApiError {
    let kept = store.manifests();
    let kept = match (kept.first(), kept.last()) {
        (Some(first), Some(last)) if first.round == last.round => {
            format!("it keeps round {}", first.round)
        }
        (Some(first), Some(last)) => format!(
            "it keeps {} rounds, from {} to {}",
            kept.len(),
            first.round,
            last.round
        ),
        _ => "it keeps none yet".to_string(),
    };
    ApiError::not_found(
        "model_not_stored",
        format!("the model of round {round} is not in the model store: {kept}"),
    )
}

/// A kept round's model, read back and checked against its manifest (a file that does not
/// match is refused, 500, never served).
async fn stored_model(aggregator: &Arc<Aggregator>, round: u32) -> Result<Response, ApiError> {
    let store = model_store(aggregator)?.clone();
    let reader = store.clone();
    let read = tokio::task::spawn_blocking(move || reader.read(round))
        .await
        .map_err(|join| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_store_error",
                format!("reading the stored model failed: {join}"),
            )
        })?;
    let (manifest, file) = match read {
        Ok(Some(found)) => found,
        Ok(None) => return Err(not_stored(&store, round)),
        Err(err) => {
            tracing::error!(round, "a stored model was not served: {err}");
            let code = match err {
                ReadError::Corrupted { .. } => "stored_model_corrupted",
                ReadError::Io { .. } => "model_store_error",
            };
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code,
                err.to_string(),
            ));
        }
    };
    let mut response = model_response(aggregator, file, manifest.round);
    if let Ok(sha256) = HeaderValue::from_str(&manifest.sha256) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static("x-rondo-sha256"), sha256);
    }
    Ok(response)
}

async fn round_manifest(
    State(aggregator): State<Arc<Aggregator>>,
    OriginalUri(uri): OriginalUri,
) -> Result<Json<crate::models::Manifest>, ApiError> {
    let round = round_param(&uri)?;
    let store = model_store(&aggregator)?;
    store
        .manifest(round)
        .map(Json)
        .ok_or_else(|| not_stored(store, round))
}

async fn stored_models(
    State(aggregator): State<Arc<Aggregator>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = model_store(&aggregator)?;
    Ok(Json(json!({
        "models": store.manifests(),
        "keep_models": store.keep(),
    })))
}

async fn download_round_model(
    State(aggregator): State<Arc<Aggregator>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let round = round_param(&uri)?;
    // Without credentials, a kept round's model is anyone's; with them, it is the round's
    // download as it always was.
    if aggregator.model_store.is_some() && !headers.contains_key(header::AUTHORIZATION) {
        return stored_model(&aggregator, round).await;
    }
    let token = bearer_token(&headers, "missing_token")?;
    let book = aggregator.book();
    book.authorize_download(token, round).map_err(grant_error)?;
    let model = book.model().ok_or_else(|| {
        ApiError::not_found("no_model", "round 0 has no global model to download")
    })?;
    Ok(model_response(&aggregator, model.file.clone(), model.round))
}

async fn download_latest_model(
    State(aggregator): State<Arc<Aggregator>>,
) -> Result<Response, ApiError> {
    let book = aggregator.book();
    let model = book.model().ok_or_else(|| {
        ApiError::not_found("no_model", "no global model yet: round 0 has not closed")
    })?;
    Ok(model_response(&aggregator, model.file.clone(), model.round))
}

/// Ends the participant's upload slot whatever happens to the request.
struct UploadSlot {
    aggregator: Arc<Aggregator>,
    grant: Grant,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.aggregator.book().end_upload(&self.grant);
    }
}

fn upload_error(err: &UploadError) -> ApiError {
    let status = match err {
        UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        UploadError::Stalled(_) | UploadError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, err.code(), err.to_string())
}

/// One span per upload (`upload`: round, attempt, participant, filled once the token says
/// whose it is), so that every event of it carries them.
#[tracing::instrument(
    name = "upload",
    skip_all,
    fields(round = tracing::field::Empty, attempt = tracing::field::Empty, participant = tracing::field::Empty)
)]
async fn upload_update(
    State(aggregator): State<Arc<Aggregator>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let started = Instant::now();
    let answer = receive_update(&aggregator, &uri, &headers, body).await;
    let outcome = if answer.is_ok() {
        "accepted"
    } else {
        "refused"
    };
    aggregator
        .metrics
        .upload_seconds
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    answer
}

/// The header in which an uploading participant names itself (the SDK always sends it): a
/// token is then accepted only from the participant it was issued to.
const PARTICIPANT_HEADER: &str = "x-rondo-participant";

/// The participant an upload says it comes from, if it says.
fn claimed_participant(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get(PARTICIPANT_HEADER)
        .map(|value| {
            value.to_str().map_err(|_| {
                ApiError::bad_request(
                    "invalid_participant",
                    format!("{PARTICIPANT_HEADER} must be a participant id (visible ASCII)"),
                )
            })
        })
        .transpose()
}

async fn receive_update(
    aggregator: &Arc<Aggregator>,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let round = round_param(uri)?;
    let token = bearer_token(headers, "missing_token")?;
    let claimed = claimed_participant(headers)?;
    let (grant, expected, already) = {
        let mut book = aggregator.book();
        match book.begin_upload_by(token, round, claimed) {
            Ok(grant) => (grant, book.expected_spec(), None),
            // A retry of an upload that was saved and accepted (its answer was lost, or the
            // aggregator restarted before it answered): read it to tell the same bytes from
            // different ones.
            Err(GrantError::Duplicate)
                if let Some((grant, digest, n_samples)) = book.accepted_update(token, round) =>
            {
                (grant, book.expected_spec(), Some((digest, n_samples)))
            }
            Err(e) => {
                let err = grant_error(e);
                // No notice: the token may not be anyone's, and the coordinator has nothing to
                // record for an upload that never started.
                aggregator
                    .metrics
                    .updates_rejected
                    .with_label_values(&[err.code])
                    .inc();
                return Err(err);
            }
        }
    };
    if let Some((digest, n_samples)) = already {
        return check_retry(aggregator, &grant, expected, body, &digest, n_samples).await;
    }
    let span = tracing::Span::current();
    span.record("round", grant.round);
    span.record("attempt", grant.attempt);
    span.record("participant", grant.participant_id.as_str());
    let slot = UploadSlot {
        aggregator: aggregator.clone(),
        grant: grant.clone(),
    };
    let reject = |err: ApiError| {
        aggregator.reject(&grant, err.code, &err.message);
        err
    };

    let update = read_body(aggregator, expected, body)
        .await
        .map_err(|e| reject(upload_error(&e)))?;

    let n_samples = update.n_samples;
    let bytes = update.data.len() as u64;
    let sum = aggregator
        .book()
        .begin_commit(&grant, &update.spec)
        .map_err(|e| reject(commit_error(e)))?;
    // A pooled buffer returns to the pool, permits and all, wherever the fold drops the update.
    // Without reuse (a rule that holds every update until the round closes) the bytes leave
    // the budget and `_staging` holds their permits only until this handler ends, so that held
    // updates cannot use up the budget and stall the uploads still to come.
    let (data, _staging) = update.data.into_bytes();
    let commit = Commit {
        grant: grant.clone(),
        sum,
        spec: update.spec,
        data,
        n_samples,
        metrics: update.metrics,
        recovered: None,
    };
    // From `begin_commit` on, the fold and its bookkeeping run to their end on a thread of
    // their own, whatever happens to this request: a participant that hangs up now is
    // counted once (and both services hear of it), never left half-committed.
    let committer = aggregator.clone();
    let committed = aggregator
        .shutdown
        .spawn_blocking(move || committer.commit(commit))
        .await;
    drop(slot);
    match committed {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(commit_error(err)),
        Err(join) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "fold_failed",
                format!("folding the update failed: {join}"),
            ));
        }
    }
    aggregator.metrics.bytes_received.inc_by(bytes);
    Ok(Json(json!({
        "accepted": true,
        "round": grant.round,
        "participant_id": grant.participant_id,
        "n_samples": n_samples,
    })))
}

/// Reads an upload's body into a staging buffer and validates it against `expected`.
async fn read_body(
    aggregator: &Arc<Aggregator>,
    expected: Option<Arc<rondo_core::model::ModelSpec>>,
    body: Body,
) -> Result<wire::StagedUpdate, UploadError> {
    // Taken before any byte of the body is read, so that uploads beyond the budget wait with
    // their bytes still in the socket. Round 0 before its first upload does not know the size
    // yet: the buffer then holds the whole budget until the header declares it.
    let staging = aggregator
        .staging
        .take(expected.as_ref().map(|spec| spec.byte_len()))
        .await;
    // A participant that stops sending mid-upload, or sends a trickle, must not hold its
    // staging memory for long. The clock starts once the staging memory is granted: waiting for
    // it is the aggregator's doing, not the participant's.
    let pace = aggregator.upload;
    let started = Instant::now();
    let mut received = 0u64;
    let body = futures::stream::unfold(body.into_data_stream(), move |mut body| async move {
        let chunk = match tokio::time::timeout(pace.idle_timeout, body.next()).await {
            Ok(Some(chunk)) => chunk.map_err(|e| BodyError::Broken(e.to_string())),
            Ok(None) => return None,
            Err(_) => Err(BodyError::Stalled(pace.idle_timeout)),
        };
        Some((chunk, body))
    })
    .map(move |chunk| {
        let chunk = chunk?;
        received += chunk.len() as u64;
        let secs = started.elapsed().as_secs_f64();
        if pace.min_bytes_per_sec > 0
            && secs > pace.idle_timeout.as_secs_f64()
            && (received as f64) < pace.min_bytes_per_sec as f64 * secs
        {
            return Err(BodyError::TooSlow(wire::UploadTooSlow {
                received,
                secs,
                min_bytes_per_sec: pace.min_bytes_per_sec,
            }));
        }
        Ok(chunk)
    });
    wire::read_update(
        Box::pin(body),
        expected.as_deref(),
        aggregator.max_body_bytes,
        &aggregator.limits,
        staging,
    )
    .await
}

/// Reads a retried upload whose update was already accepted and saved: the same bytes (and
/// sample count) get the answer the first attempt should have had, other bytes a 409. Nothing
/// is counted either way.
async fn check_retry(
    aggregator: &Arc<Aggregator>,
    grant: &crate::rounds::Grant,
    expected: Option<Arc<rondo_core::model::ModelSpec>>,
    body: Body,
    digest: &str,
    accepted_samples: u64,
) -> Result<Json<serde_json::Value>, ApiError> {
    let update = read_body(aggregator, expected, body)
        .await
        .map_err(|e| upload_error(&e))?;
    let n_samples = update.n_samples;
    let (data, _staging) = update.data.into_bytes();
    if crate::models::sha256_hex(&data) != digest || n_samples != accepted_samples {
        return Err(ApiError::conflict(
            "duplicate_update",
            "an update with other bytes was already accepted for this participant in this round",
        ));
    }
    tracing::info!(round = grant.round, participant = %grant.participant_id, "a retried upload was already accepted");
    Ok(Json(json!({
        "accepted": true,
        "round": grant.round,
        "participant_id": grant.participant_id,
        "n_samples": n_samples,
        "already_accepted": true,
    })))
}

async fn status(State(aggregator): State<Arc<Aggregator>>) -> Json<serde_json::Value> {
    let book = aggregator.book();
    let model = book.model().map(|m| {
        json!({
            "round": m.round,
            "bytes": m.file.len(),
            "tensors": m.spec.tensors.len(),
            "elements": m.spec.element_count(),
        })
    });
    let open_round = book
        .open_round_id()
        .map(|(round, attempt)| json!({"round": round, "attempt": attempt}));
    let accepted = book.accepted();
    drop(book);
    let store = aggregator.model_store.as_ref().map(|store| {
        json!({
            "dir": store.dir().display().to_string(),
            "keep_models": store.keep(),
            "models": store.count(),
            "latest_round": store.latest().map(|m| m.round),
            "errors": aggregator.metrics.store_errors.get(),
            "last_error": store.last_failure(),
        })
    });
    Json(json!({
        "model": model,
        "open_round": open_round,
        "accepted": accepted,
        "public_url": aggregator.public_url,
        "store": store,
    }))
}

async fn metrics(State(aggregator): State<Arc<Aggregator>>) -> Response {
    // The staging gauges are read off the pool when scraped, not kept up to date per upload.
    let staging = &aggregator.staging;
    let budget = u64::from(staging.budget_units());
    let held = budget.saturating_sub(staging.available_units() as u64);
    let metrics = &aggregator.metrics;
    metrics
        .staging_budget_bytes
        .set((budget * STAGING_UNIT) as i64);
    metrics
        .staging_reserved_bytes
        .set((held * STAGING_UNIT) as i64);
    api::metrics_response(&metrics.registry)
}
