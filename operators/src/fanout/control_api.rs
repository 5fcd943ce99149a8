//! The control API: the device registry (`/v1/admin/devices`), rules (`/v1/rules`) and active
//! alarms (`/v1/alarms`). Until authentication arrives (step 4) the owner is a field of the rule
//! and an `owner` query parameter; from then on it is the authenticated caller.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use iotpipe_rules::engine::Rule;
use serde::Deserialize;
use serde_json::json;

use super::api::ApiError;
use super::AppState;
use crate::control::{Control, ControlError};

/// Routes of the control API (404 where the process has no control plane).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/devices", get(list_devices))
        .route(
            "/v1/admin/devices/{id}",
            put(put_device).delete(delete_device).get(get_device),
        )
        .route("/v1/rules", get(list_rules))
        .route(
            "/v1/rules/{id}",
            put(put_rule).get(get_rule).delete(delete_rule),
        )
        .route("/v1/alarms", get(alarms))
}

fn control(state: &AppState) -> Result<&Control, ApiError> {
    state
        .control
        .as_deref()
        .ok_or_else(|| ApiError::not_found("the control plane does not run in this process"))
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid(m) => ApiError::bad_request(m),
            ControlError::Compile {
                line,
                column,
                message,
            } => ApiError::compile(line, column, message),
            ControlError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceBody {
    owner: String,
    #[serde(default)]
    groups: Vec<String>,
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("body: {e}")))
}

async fn put_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: DeviceBody = body(&raw)?;
    let entry = control(&state)?
        .register_device(&id, &b.owner, b.groups)
        .await?;
    Ok(Json(entry).into_response())
}

async fn get_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let c = control(&state)?;
    match c
        .registry
        .store()
        .get(&id)
        .await
        .map_err(ControlError::from)?
    {
        Some(e) => Ok(Json(e).into_response()),
        None => Err(ApiError::not_found(format!(
            "device `{id}` is not registered"
        ))),
    }
}

async fn delete_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if control(&state)?.remove_device(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!(
            "device `{id}` is not registered"
        )))
    }
}

async fn list_devices(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let devices = control(&state)?
        .devices(q.get("owner").map(String::as_str))
        .await?;
    Ok(Json(json!({"devices": devices})).into_response())
}

/// A rule as the API shows it: webhook secrets are never returned.
fn public(mut r: Rule) -> Rule {
    for w in &mut r.notify {
        if !w.secret.is_empty() {
            w.secret = "********".into();
        }
    }
    r
}

async fn put_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut v: serde_json::Value = body(&raw)?;
    match v.get("id") {
        Some(serde_json::Value::String(body_id)) if *body_id != id => {
            return Err(ApiError::bad_request(format!(
                "the body's id `{body_id}` is not the path's `{id}`"
            )))
        }
        _ => {}
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), json!(id));
        // The server sets versions.
        o.remove("version");
    }
    let rule: Rule =
        serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let stored = control(&state)?.put_rule(rule).await?;
    Ok(Json(public(stored)).into_response())
}

async fn get_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match control(&state)?.rule(&id).await? {
        Some(r) => Ok(Json(public(r)).into_response()),
        None => Err(ApiError::not_found(format!("no rule `{id}`"))),
    }
}

async fn delete_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if control(&state)?.delete_rule(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("no rule `{id}`")))
    }
}

async fn list_rules(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let rules: Vec<Rule> = control(&state)?
        .rules(q.get("owner").map(String::as_str))
        .await?
        .into_iter()
        .map(public)
        .collect();
    Ok(Json(json!({"rules": rules})).into_response())
}

async fn alarms(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let alarms = control(&state)?
        .alarms(q.get("owner").map(String::as_str))
        .await?;
    Ok(Json(json!({"alarms": alarms})).into_response())
}
