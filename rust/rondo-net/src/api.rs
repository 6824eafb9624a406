//! What every Rondo HTTP API answers the same way.

use axum::Json;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

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

/// The `code` of an error answer, attached to the response so that a layer can count refusals
/// by code ([`count_refused`]) without reading bodies back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// Counts every error answer by its code (`requests_refused_total{code}`), for
/// `axum::middleware::map_response_with_state`. The codes are constants in the code, so the
/// label stays a small set whatever clients send.
pub async fn count_refused(
    axum::extract::State(counter): axum::extract::State<prometheus::IntCounterVec>,
    response: Response,
) -> Response {
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        counter.with_label_values(&[code]).inc();
    }
    response
}

/// `requests_refused_total{code}`, for [`count_refused`].
pub fn refused_counter() -> prometheus::IntCounterVec {
    prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "requests_refused_total",
            "HTTP requests answered with an error, by the error's code",
        ),
        &["code"],
    )
    .expect("a valid metric")
}

/// A layer that answers 413 with the JSON error `code` to a request whose `Content-Length`
/// exceeds `max` bytes, before its body is read. Without it, a body limit applied while
/// reading (axum's `DefaultBodyLimit`, or an upload handler's own count) only notices once the
/// client has sent that much, and a client that declared too much and then waits for an answer
/// holds the connection until a timeout. A body without a `Content-Length` (chunked) still
/// needs that limit while reading. (tower-http's `RequestBodyLimitLayer` makes the same check
/// but answers in plain text, not in the JSON error shape.)
pub fn reject_oversized(
    max: u64,
    code: &'static str,
) -> ValidateRequestHeaderLayer<RejectOversized> {
    ValidateRequestHeaderLayer::custom(RejectOversized { max, code })
}

/// See [`reject_oversized`].
#[derive(Debug, Clone, Copy)]
pub struct RejectOversized {
    max: u64,
    code: &'static str,
}

impl<B> ValidateRequest<B> for RejectOversized {
    type ResponseBody = axum::body::Body;

    fn validate(&mut self, request: &mut Request<B>) -> Result<(), Response> {
        // hyper has already refused a `Content-Length` that is not a number, with 400.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(length) if length > self.max => Err(closing(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                self.code,
                format!(
                    "the body is {length} bytes (Content-Length), more than the {} allowed",
                    self.max
                ),
            ))),
            _ => Ok(()),
        }
    }
}

/// `error` as a response that closes the connection: for a request refused before its body
/// was read, whose unread bytes must not be taken for the next request (hyper would otherwise
/// keep the connection and wait to discard the body the client may never send).
pub fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
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

/// A Prometheus registry with every metric name prefixed by `prefix` (e.g. `rondo_aggregator`),
/// and `<prefix>_build_info{version}` (always 1). The metrics are built from constant names in
/// the code, so a failure here is a bug.
pub fn registry(prefix: &str, metrics: Vec<Box<dyn prometheus::core::Collector>>) -> Registry {
    let registry =
        Registry::new_custom(Some(prefix.into()), None).expect("the prefix is a valid name");
    let build_info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("build_info", "The running build: its version (always 1)"),
        &["version"],
    )
    .expect("a valid metric");
    // The crates share the workspace's version.
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    registry
        .register(Box::new(build_info))
        .expect("metric names are unique");
    for metric in metrics {
        registry.register(metric).expect("metric names are unique");
    }
    registry
}

/// Renders a Prometheus registry in the text exposition format, followed by the process's own
/// `process_*` metrics (RSS, CPU seconds, open and maximum fds, threads, start time: the
/// `prometheus` crate's process collector, which its default registry holds on Linux). They
/// keep their standard unprefixed names, so dashboards made for any service work on them.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut buffer = Vec::new();
    let mut families = registry.gather();
    families.extend(prometheus::gather());
    if let Err(err) = TextEncoder::new().encode(&families, &mut buffer) {
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
