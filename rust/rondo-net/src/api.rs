//! What every Rondo HTTP API answers the same way.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;

/// An error answer: an HTTP status and `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// The bearer token of a request, or `missing_code` when there is none.
pub fn bearer_token<'a>(
    headers: &'a HeaderMap,
    missing_code: &'static str,
) -> Result<&'a str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                missing_code,
                "an `Authorization: Bearer <token>` header is required",
            )
        })
}

/// The routes every Rondo HTTP API has besides its own: `/openapi.json` (the document compiled
/// into the binary), `/healthz`, and JSON answers for unknown paths and methods.
pub fn with_common_routes<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    openapi: &'static str,
) -> axum::Router<S> {
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || async move { openapi_response(openapi) }),
        )
        .route("/healthz", axum::routing::get(healthz))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
}

/// Serves an OpenAPI document that was compiled into the binary.
pub fn openapi_response(document: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// A Prometheus registry with every metric name prefixed by `prefix` (e.g. `rondo_aggregator`).
/// The metrics are built from constant names in the code, so a failure here is a bug.
pub fn registry(prefix: &str, metrics: Vec<Box<dyn prometheus::core::Collector>>) -> Registry {
    let registry =
        Registry::new_custom(Some(prefix.into()), None).expect("the prefix is a valid name");
    for metric in metrics {
        registry.register(metric).expect("metric names are unique");
    }
    registry
}

/// Renders a Prometheus registry in the text exposition format.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut buffer = Vec::new();
    if let Err(err) = TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics",
            err.to_string(),
        )
        .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        buffer,
    )
        .into_response()
}

pub async fn healthz() -> &'static str {
    "ok"
}

/// Answer for paths no route matches, so that even a typo gets the JSON error shape.
pub async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("unknown_route", format!("no endpoint at {}", uri.path()))
}

/// Answer for a routed path asked with a method it does not serve.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
}
