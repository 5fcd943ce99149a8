//! The control API: the device registry (`/v1/admin/devices`, administrators only), rules
//! (`/v1/rules`) and active alarms (`/v1/alarms`).
//!
//! A caller's rules and alarms are their own: the rule owner is the caller, another user's rule
//! answers 404 like one that does not exist, and lists show the caller's only. Administrators may
//! name an owner (the rule's `owner` field, the `owner` query parameter). Without authentication
//! (`fanout.auth.mode = "none"`, loopback only) every caller is an administrator.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use iotpipe_rules::engine::Rule;
use serde::Deserialize;
use serde_json::json;

use super::api::{require_admin, ApiError, Who};
use super::auth::Caller;
use super::AppState;
use crate::control::{Control, ControlError};

/// Routes of the control API (404 where the process has no control plane).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/devices", get(list_devices).post(register_many))
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
    Extension(caller): Who,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let b: DeviceBody = body(&raw)?;
    let entry = control(&state)?
        .register_device(&id, &b.owner, b.groups)
        .await?;
    Ok(Json(entry).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkEntry {
    device: String,
    owner: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    devices: Vec<BulkEntry>,
}

/// Most devices in one bulk registration.
pub const MAX_BULK_DEVICES: usize = 10_000;

async fn register_many(
    State(state): State<AppState>,
    Extension(caller): Who,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let b: BulkBody = body(&raw)?;
    if b.devices.len() > MAX_BULK_DEVICES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BULK_DEVICES} devices per request"
        )));
    }
    let entries = control(&state)?
        .register_devices(
            b.devices
                .into_iter()
                .map(|e| (e.device, e.owner, e.groups))
                .collect(),
        )
        .await?;
    Ok(Json(json!({"registered": entries.len()})).into_response())
}

async fn get_device(
    State(state): State<AppState>,
    Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
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
    Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
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
    Extension(caller): Who,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let devices = control(&state)?
        .devices(q.get("owner").map(String::as_str))
        .await?;
    Ok(Json(json!({"devices": devices})).into_response())
}

/// The owner a list is about: the caller, or for an administrator the `owner` parameter (all
/// owners without one).
fn list_owner<'a>(caller: &'a Caller, q: &'a HashMap<String, String>) -> Option<&'a str> {
    if caller.admin {
        q.get("owner").map(String::as_str)
    } else {
        Some(&caller.user)
    }
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
    Extension(caller): Who,
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
    let control = control(&state)?;
    // Someone else's rule of this id: the same answer as for a rule that does not exist would
    // leak nothing, but a PUT would take it over; refuse.
    if !caller.admin {
        if let Some(existing) = control.rule(&id).await? {
            if existing.owner != *caller.user {
                return Err(ApiError::forbidden(format!(
                    "rule id `{id}` is taken; choose another"
                )));
            }
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), json!(id));
        // The server sets versions.
        o.remove("version");
        match o.get("owner") {
            None => {
                o.insert("owner".into(), json!(&*caller.user));
            }
            Some(owner) if !caller.admin && owner.as_str() != Some(&caller.user) => {
                return Err(ApiError::forbidden(
                    "a rule's owner is the caller; only administrators may name another",
                ));
            }
            Some(_) => {}
        }
    }
    let rule: Rule =
        serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let stored = control.put_rule(rule).await?;
    Ok(Json(public(stored)).into_response())
}

/// The rule `id` if the caller may see it (their own, or any for an administrator).
async fn visible_rule(control: &Control, caller: &Caller, id: &str) -> Result<Rule, ApiError> {
    match control.rule(id).await? {
        Some(r) if caller.admin || r.owner == *caller.user => Ok(r),
        _ => Err(ApiError::not_found(format!("no rule `{id}`"))),
    }
}

async fn get_rule(
    State(state): State<AppState>,
    Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let r = visible_rule(control(&state)?, &caller, &id).await?;
    Ok(Json(public(r)).into_response())
}

async fn delete_rule(
    State(state): State<AppState>,
    Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let control = control(&state)?;
    visible_rule(control, &caller, &id).await?;
    if control.delete_rule(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("no rule `{id}`")))
    }
}

async fn list_rules(
    State(state): State<AppState>,
    Extension(caller): Who,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let rules: Vec<Rule> = control(&state)?
        .rules(list_owner(&caller, &q))
        .await?
        .into_iter()
        .map(public)
        .collect();
    Ok(Json(json!({"rules": rules})).into_response())
}

async fn alarms(
    State(state): State<AppState>,
    Extension(caller): Who,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let alarms = control(&state)?.alarms(list_owner(&caller, &q)).await?;
    Ok(Json(json!({"alarms": alarms})).into_response())
}
