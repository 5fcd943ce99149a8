//! The HTTP API: device list, latest state, history, dead letters, info, health, metrics, the
//! WebSocket endpoint and the dashboard. Errors are JSON `{"error":{"code","message"}}`; bad
//! parameters are 400s, never 500s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Path, Query, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use iotpipe_pipeline::health::Readiness;
use iotpipe_pipeline::ratelimit::Quota;
use iotpipe_pipeline::record::validate_device_id;
use iotpipe_pipeline::store::{DeviceSummary, HistoryQuery, Order, StoreError};
use iotpipe_pipeline::time::parse_ms_or_rfc3339;
use iotpipe_pipeline::Retryable;
use serde_json::json;
use tracing::error;

use super::auth::Caller;
use super::AppState;

const DASHBOARD: &str = include_str!("dashboard.html");

/// An API error with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Where in a rule script the error is (line, column).
    at: Option<(usize, usize)>,
    /// Seconds to wait (429), sent as `Retry-After`.
    retry_after: Option<u64>,
}

impl ApiError {
    /// 503: a backend is unavailable.
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
            at: None,
            retry_after: None,
        }
    }

    /// 422: a rule script does not compile; the body says where.
    pub(crate) fn compile(line: usize, column: usize, message: String) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "compile_error",
            message: format!("{line}:{column}: {message}"),
            at: Some((line, column)),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            at: None,
            retry_after: None,
        }
    }

    /// 401: no valid token.
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
            at: None,
            retry_after: None,
        }
    }

    /// 403: the caller may not see this (the same answer for things that do not exist).
    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: message.into(),
            at: None,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After` (whole seconds, rounded up).
    pub(crate) fn too_many(code: &'static str, message: impl Into<String>, wait: Duration) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code,
            message: message.into(),
            at: None,
            retry_after: Some(wait.as_millis().div_ceil(1000).max(1) as u64),
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            at: None,
            retry_after: None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e.class() {
            iotpipe_pipeline::ErrorClass::Input => Self::bad_request(e.to_string()),
            iotpipe_pipeline::ErrorClass::External => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "unavailable",
                message: e.to_string(),
                at: None,
                retry_after: None,
            },
            iotpipe_pipeline::ErrorClass::Bug => {
                error!(error = %e, "Store failed.");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: "internal error".into(),
                    at: None,
                    retry_after: None,
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some((line, column)) = self.at {
            error["line"] = json!(line);
            error["column"] = json!(column);
        }
        if let Some(secs) = self.retry_after {
            error["retry_after_ms"] = json!(secs * 1000);
            let mut res = (self.status, Json(json!({ "error": error }))).into_response();
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            return res;
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/info", get(info))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{id}/latest", get(latest))
        .route("/v1/devices/{id}/history", get(history))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/ws", get(ws))
        .merge(super::control_api::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts requests by route and status and times them. The route is the matched pattern, never
/// the raw path, so the label stays bounded.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let started = Instant::now();
    let res = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, res.status().as_str()])
        .inc();
    state
        .metrics
        .http_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    res
}

/// Authenticates `/v1/*` calls (except `/v1/info`, and `/v1/ws`, which answers for itself),
/// counts them against the caller's tier, and hands the [`Caller`] to the handler.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/v1/") || path == "/v1/ws" || path == "/v1/info" {
        return next.run(req).await;
    }
    let caller = match state.auth.from_request(req.headers(), req.uri().query()) {
        Ok(c) => c,
        Err(e) => return ApiError::unauthorized(e.to_string()).into_response(),
    };
    let tier = state.config.tier(caller.tier.as_deref());
    let quota = Quota::per_minute(tier.requests_per_minute, tier.burst);
    if let Some(retry_after) = state.over_limit(&caller, "rest", &quota).await {
        return ApiError::too_many(
            "rate_limited",
            format!("more than {} requests per minute", tier.requests_per_minute),
            retry_after,
        )
        .into_response();
    }
    req.extensions_mut().insert(Arc::new(caller));
    next.run(req).await
}

/// The caller of an authenticated route.
pub(crate) type Who = Extension<Arc<Caller>>;

/// 403 unless the caller may see `device` (unknown and foreign devices answer the same).
pub(crate) async fn check_access(
    state: &AppState,
    caller: &Caller,
    device: &str,
) -> Result<(), ApiError> {
    if state.may_see(caller, device).await? {
        Ok(())
    } else {
        Err(ApiError::forbidden("no such device, or not yours"))
    }
}

/// 403 unless the caller is an administrator.
pub(crate) fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "this endpoint needs an administrator's token",
        ))
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    readiness_response(&state.ready, state.shutdown.is_cancelled())
}

/// 200 `ready`, or 503 naming what is not ready.
pub fn readiness_response(ready: &Readiness, stopping: bool) -> Response {
    let mut failing = ready.failing();
    if stopping {
        failing.push("shutting down".into());
    }
    if failing.is_empty() {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", failing.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.info.as_ref().clone())
}

fn parse_limit(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(default.min(max)),
        Some(s) => match s.parse::<usize>() {
            Ok(0) | Err(_) => Err(ApiError::bad_request(format!(
                "limit must be a positive integer, got `{s}`"
            ))),
            Ok(n) => Ok(n.min(max)),
        },
    }
}

fn check_device(id: &str) -> Result<(), ApiError> {
    validate_device_id(id).map_err(|e| ApiError::bad_request(e.detail))
}

async fn devices(
    State(state): State<AppState>,
    Extension(caller): Who,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = parse_limit(&params, 1000, state.config.max_list_limit)?;
    if caller.admin {
        let list = state.latest.devices(limit).await?;
        return Ok(Json(json!({"devices": list})).into_response());
    }
    let mut list = Vec::new();
    for device in state.visible_devices(&caller, usize::MAX).await? {
        if list.len() >= limit {
            break;
        }
        if let Some(s) = state.latest.get(&device).await? {
            list.push(DeviceSummary {
                device: s.device.clone(),
                last_seen: s.last_seen,
                ts: s.ts,
                seq: s.seq,
            });
        }
    }
    list.sort_by_key(|d| std::cmp::Reverse(d.last_seen));
    Ok(Json(json!({"devices": list})).into_response())
}

async fn latest(
    State(state): State<AppState>,
    Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_device(&id)?;
    check_access(&state, &caller, &id).await?;
    let s = state
        .latest
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device `{id}`")))?;
    Ok(Json(json!({"device": s.device, "ts": s.ts, "seq": s.seq, "last_seen": s.last_seen, "state": s.values()})).into_response())
}

async fn history(
    State(state): State<AppState>,
    Extension(caller): Who,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_device(&id)?;
    check_access(&state, &caller, &id).await?;
    let time = |name: &str, default: i64| -> Result<i64, ApiError> {
        params.get(name).map_or(Ok(default), |s| {
            parse_ms_or_rfc3339(s).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
        })
    };
    let from = time("from", i64::MIN)?;
    let to = time("to", i64::MAX)?;
    if from > to {
        return Err(ApiError::bad_request("from must not be after to"));
    }
    let order = match params.get("order").map(String::as_str) {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "order must be `asc` or `desc`, got `{o}`"
            )))
        }
    };
    let limit = parse_limit(&params, 100, state.config.max_history_limit)?;
    let cursor = params.get("cursor").cloned();
    let cache_key = format!(
        "history:{id}:{from}:{to}:{limit}:{order:?}:{}",
        cursor.as_deref().unwrap_or("")
    );
    if let Some((cache, _)) = &state.history_cache {
        // A cache failure is not the client's problem: fall through to the store.
        if let Ok(Some(body)) = cache.get(&cache_key).await {
            return Ok(json_with_cache(body, Some("HIT")));
        }
    }
    let q = HistoryQuery {
        device: id.clone(),
        from,
        to,
        limit,
        order,
        cursor,
    };
    let page = state.history.query(&q).await?;
    let items: Vec<_> = page
        .items
        .into_iter()
        .map(|i| json!({"ts": i.ts, "metrics": i.metrics}))
        .collect();
    let body = json!({"device": id, "items": items, "next_cursor": page.next_cursor}).to_string();
    match &state.history_cache {
        Some((cache, ttl)) => {
            if let Err(e) = cache.put(&cache_key, &body, *ttl).await {
                tracing::debug!(error = %e, "History cache write failed.");
            }
            Ok(json_with_cache(body, Some("MISS")))
        }
        None => Ok(json_with_cache(body, None)),
    }
}

fn json_with_cache(body: String, cache: Option<&'static str>) -> Response {
    let mut res = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(c) = cache {
        res.headers_mut().insert(
            header::HeaderName::from_static("x-cache"),
            header::HeaderValue::from_static(c),
        );
    }
    res
}

async fn dead_letters(
    State(state): State<AppState>,
    Extension(caller): Who,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    // Dead letters carry any device's payload.
    require_admin(&caller)?;
    let limit = parse_limit(&params, 100, state.config.max_list_limit)?;
    let letters = state.dead_letters.recent(limit).await?;
    Ok(Json(json!({"dead_letters": letters})).into_response())
}

async fn ws(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Response {
    let caller = match state.auth.from_request(&headers, uri.query()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            state
                .metrics
                .ws_rejected
                .with_label_values(&["unauthorized"])
                .inc();
            return ApiError::unauthorized(e.to_string()).into_response();
        }
    };
    let cap = if caller.authenticated {
        state.config.tier(caller.tier.as_deref()).connections
    } else {
        usize::MAX
    };
    let rx = match state.hub.connect(Arc::clone(&caller), cap) {
        Ok(rx) => rx,
        Err(_) => {
            state
                .metrics
                .ws_rejected
                .with_label_values(&["too_many_connections"])
                .inc();
            return ApiError::too_many(
                "too_many_connections",
                format!("at most {cap} open connections per user"),
                Duration::from_secs(5),
            )
            .into_response();
        }
    };
    let admitted = super::ws::Admitted::new(rx, Arc::clone(&state.hub));
    let max = state.config.max_message_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        // The library's defaults (128 KiB each) would cost ~150 KiB per idle connection; clients
        // send little, and updates are flushed in batches anyway (both grow when needed).
        .read_buffer_size(2 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| super::ws::serve(socket, state, admitted))
}
