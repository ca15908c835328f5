//! The control plane's `/v1` API: clusters and tenants, over the catalog. Bearer tokens (`admin` may change,
//! `read` may look); every change is written to the audit log.

// Handlers return early with a finished `Response` as the error value; it is big, and that is fine off the data path.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::ApiError;
use crate::catalog::branches;
use crate::catalog::control::Control;
use crate::catalog::provision::ClusterAdmin;
use crate::catalog::store::{TenantRow, TokenInfo};
use crate::catalog::tenants::{self, CreateError, Created, NewTenant};
use crate::server::Proxy;

/// The `/v1` routes (and the OpenAPI document that lists them).
pub fn routes() -> Router<Arc<Proxy>> {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/clusters", get(list_clusters))
        .route("/v1/clusters/{name}", put(put_cluster))
        .route(
            "/v1/clusters/{name}/drain",
            axum::routing::post(drain_cluster),
        )
        .route("/v1/tokens/{name}", put(put_token).delete(delete_token))
        .route("/v1/tenants", get(list_tenants))
        .route(
            "/v1/tenants/{id}",
            put(put_tenant)
                .get(get_tenant)
                .delete(delete_tenant)
                .patch(patch_tenant),
        )
        .route("/v1/tenants/{id}/users", get(list_users))
        .route(
            "/v1/tenants/{id}/users/{name}",
            put(put_user).delete(delete_user),
        )
        .route("/v1/tenants/{id}/pause", axum::routing::post(pause_tenant))
        .route(
            "/v1/tenants/{id}/resume",
            axum::routing::post(resume_tenant),
        )
        .route(
            "/v1/tenants/{id}/branches",
            get(list_branches).post(create_branch),
        )
        .route(
            "/v1/tenants/{id}/branches/{name}",
            get(get_branch).delete(delete_branch),
        )
        .route(
            "/v1/tenants/{id}/branches/{name}/reset",
            axum::routing::post(reset_branch),
        )
        .route("/v1/operations/{op}", get(get_operation))
        .route("/v1/reload", axum::routing::post(reload))
        .route("/v1/tenants/{id}/pools", get(tenant_pools))
        .route("/v1/tenants/{id}/usage", get(tenant_usage))
        .route(
            "/v1/tenants/{id}/read-only",
            axum::routing::post(set_read_only),
        )
        .route("/v1/tenants/{id}/policy", get(tenant_policy))
        .route("/v1/plans", get(list_plans))
        .route("/v1/plans/{name}", get(get_plan).put(put_plan))
}

/// Every route of the API, as `(method, path)`; the OpenAPI document is built from this list and a test checks
/// that the router and the document agree.
pub const ROUTES: &[(&str, &str, &str)] = &[
    ("get", "/v1/openapi.json", "This document."),
    ("put", "/v1/tokens/{name}", "Create or replace an API token: {\"scope\": \"admin\"|\"read\"}; the token is in the answer, once (admin)."),
    ("delete", "/v1/tokens/{name}", "Revoke an API token (admin)."),
    ("get", "/v1/clusters", "Clusters with their tenant count and health (read)."),
    ("put", "/v1/clusters/{name}", "Register or update a backend cluster: {host, port?, admin_user, admin_password?, capacity?, max_active_transactions?} (admin)."),
    ("post", "/v1/clusters/{name}/drain", "Drain a cluster: no new tenants are placed on it; {\"draining\": false} undoes it (admin)."),
    ("get", "/v1/tenants", "List tenants, paged: ?after=<id>&limit=<1..1000> (read)."),
    ("put", "/v1/tenants/{id}", "Create a tenant (idempotent: the same body again is the same tenant, another body is 409) (admin)."),
    ("get", "/v1/tenants/{id}", "One tenant (read)."),
    ("delete", "/v1/tenants/{id}", "Delete a tenant: no new connections, then its databases and role are dropped (admin)."),
    ("patch", "/v1/tenants/{id}", "Change a tenant's plan: {\"plan\": \"pro\"} (connection limit and pool size follow) (admin)."),
    ("get", "/v1/tenants/{id}/users", "The tenant's users (read)."),
    ("put", "/v1/tenants/{id}/users/{name}", "Add a user or rotate its password: {\"password\"?} (generated and shown once when absent); open sessions keep working (admin)."),
    ("delete", "/v1/tenants/{id}/users/{name}", "Remove a user; its open sessions keep working until they end (admin)."),
    ("post", "/v1/tenants/{id}/pause", "Pause a tenant's main database or a branch: {\"branch\"?, \"timeout_ms\"?}; waits for transactions in flight (at most timeout_ms, default 30000), holds new ones and closes idle server connections; this instance (admin)."),
    ("post", "/v1/tenants/{id}/resume", "Resume a paused database: {\"branch\"?}; held transactions go on in the order they came (admin)."),
    ("post", "/v1/tenants/{id}/branches", "Create a branch: {\"name\", \"parent\"? (default main), \"expires_at\"? (RFC 3339), \"pause_timeout_ms\"?, \"terminate_other_sessions\"?}; answers 202 with an operation to poll (admin)."),
    ("get", "/v1/tenants/{id}/branches", "The tenant's branches: name, parent, state, created_at, expires_at, size_bytes, endpoint, connection_string (read)."),
    ("get", "/v1/tenants/{id}/branches/{name}", "One branch (read)."),
    ("delete", "/v1/tenants/{id}/branches/{name}", "Delete a branch (not main, not one with branches of its own); answers 202 with an operation (admin)."),
    ("post", "/v1/tenants/{id}/branches/{name}/reset", "Copy the branch again from its parent (same pause rules as create); answers 202 with an operation (admin)."),
    ("post", "/v1/reload", "Reload this instance as SIGHUP does: the TLS certificate and the config file's tenants and clusters; answers which changed sections need a restart (admin)."),
    ("get", "/v1/operations/{op}", "A long operation: status running|succeeded|failed, error, result (pause_ms, copy_ms, strategy, …) (read)."),
    ("get", "/v1/tenants/{id}/pools", "This instance's pools of the tenant, in the terms of PgBouncer's SHOW POOLS (read)."),
    ("post", "/v1/tenants/{id}/read-only", "Switch a tenant's read-only mode: {\"read_only\": true|false}; writes and DDL get 25006, reads keep working; every instance follows within seconds (admin)."),
    ("get", "/v1/tenants/{id}/policy", "The tenant's policy on this instance: plan spec, read-only state and why, sampled storage, this month's queries, client connections, refusals by rule and the latest ones with statement fingerprints, and the top 20 statements by total time (calls, total/mean ms, rows) (read)."),
    ("get", "/v1/plans", "Plans: name, max_connections (backend role limit), pool_size, max_branches, spec (the data plane's limits and SQL policy) (read)."),
    ("get", "/v1/plans/{name}", "One plan (read)."),
    ("put", "/v1/plans/{name}", "Create or change a plan: {\"max_connections\"?, \"pool_size\"?, \"max_branches\"?, \"spec\"?}; running sessions follow a new spec within seconds (admin)."),
    ("get", "/v1/tenants/{id}/usage", "Usage for billing since ?since=<RFC 3339> (default: all): connections, queries, transactions, bytes, storage (read)."),
];

async fn openapi() -> Json<Value> {
    let mut paths = Map::new();
    for (method, path, summary) in ROUTES {
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry.as_object_mut().expect("an object").insert(
            method.to_string(),
            json!({
                "summary": summary,
                "responses": {"default": {"description": "JSON; errors are {code, message, details?}"}}
            }),
        );
    }
    Json(json!({
        "openapi": "3.0.3",
        "info": {"title": "pgweir admin API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }))
}

/// What a route needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Read,
    Admin,
}

/// The control plane and the caller's token, or the error response.
async fn authorize(
    proxy: &Proxy,
    headers: &HeaderMap,
    need: Scope,
) -> Result<(Arc<Control>, TokenInfo), Response> {
    let Some(control) = proxy.control.clone() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_catalog",
            "this pgweir has no catalog ([catalog] in its config)",
        ));
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let unauthorized = || {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("a header value"),
        );
        r
    };
    let Some(bearer) = bearer else {
        return Err(unauthorized());
    };
    let Some(token) = control.authorize(bearer).await else {
        return Err(unauthorized());
    };
    if need == Scope::Admin && token.scope != "admin" {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token \"{}\" may only read", token.name),
        ));
    }
    Ok((control, token))
}

/// A change request: the admin token's control plane and caller, and the JSON object body.
async fn admin_request(
    proxy: &Proxy,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Arc<Control>, TokenInfo, Map<String, Value>), Response> {
    let (control, token) = authorize(proxy, headers, Scope::Admin).await?;
    Ok((control, token, json_object(body)?))
}

/// 404 with the error shape.
fn not_found(message: impl Into<String>) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", message)
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::response(status, code, message)
}

fn invalid(problems: Vec<(String, String)>) -> Response {
    let details: Vec<Value> = problems
        .iter()
        .map(|(field, problem)| json!({"field": field, "problem": problem}))
        .collect();
    let body = json!({
        "code": "invalid_request",
        "message": format!("{} problem(s) in the request", problems.len()),
        "details": details,
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "admin API: catalog error");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "catalog_unavailable",
        "the catalog could not be read or written; try again",
    )
}

/// The request body as a JSON object (an empty body is `{}`).
fn json_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid(vec![(
            "".into(),
            "the body must be a JSON object".into(),
        )])),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// A DNS label of at most `max` characters without `--` (tenant ids, cluster names).
fn valid_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A plain lower-case SQL name (users, logical databases).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Takes the string field `key` out of `body` (recording a problem when it is not a string).
fn string_field(
    body: &mut Map<String, Value>,
    key: &str,
    problems: &mut Vec<(String, String)>,
) -> Option<String> {
    match body.remove(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            problems.push((key.into(), "must be a string".into()));
            None
        }
    }
}

async fn put_cluster(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    if !valid_label(&name, 63) {
        problems.push((
            "name".into(),
            "must be a DNS label: a-z, 0-9 and '-'".into(),
        ));
    }
    let host = string_field(&mut body, "host", &mut problems);
    if host.as_deref().is_none_or(str::is_empty) {
        problems.push(("host".into(), "is required".into()));
    }
    let port = match body.remove("port") {
        None => Some(5432),
        Some(Value::Number(n)) => match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => Some(p),
            _ => {
                problems.push(("port".into(), "must be 1..65535".into()));
                None
            }
        },
        Some(_) => {
            problems.push(("port".into(), "must be a number".into()));
            None
        }
    };
    let user = string_field(&mut body, "admin_user", &mut problems);
    if user.as_deref().is_none_or(str::is_empty) {
        problems.push(("admin_user".into(), "is required".into()));
    }
    let password = string_field(&mut body, "admin_password", &mut problems);
    let capacity = match body.remove("capacity") {
        None => Some(100),
        Some(Value::Number(n)) => match n.as_i64().and_then(|c| i32::try_from(c).ok()) {
            Some(c) if c > 0 => Some(c),
            _ => {
                problems.push(("capacity".into(), "must be a positive number".into()));
                None
            }
        },
        Some(_) => {
            problems.push(("capacity".into(), "must be a number".into()));
            None
        }
    };
    let max_active = match body.remove("max_active_transactions") {
        None => None,
        Some(Value::Number(n)) => match n.as_i64().and_then(|c| i32::try_from(c).ok()) {
            Some(c) if c >= 0 => Some(c),
            _ => {
                problems.push((
                    "max_active_transactions".into(),
                    "must be 0 (no cap) or a positive number".into(),
                ));
                None
            }
        },
        Some(_) => {
            problems.push(("max_active_transactions".into(), "must be a number".into()));
            None
        }
    };
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let admin = ClusterAdmin {
        name: name.clone(),
        host: host.unwrap_or_default(),
        port: port.unwrap_or(5432),
        user: user.unwrap_or_default(),
        password,
    };
    let result = control
        .catalog
        .put_cluster(&admin, capacity.unwrap_or(100), max_active)
        .await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    control
        .catalog
        .audit(
            &token.name,
            "cluster.put",
            &name,
            outcome,
            json!({"host": admin.host, "port": admin.port, "max_active_transactions": max_active}),
        )
        .await;
    match result {
        Ok(()) => (
            StatusCode::OK,
            Json(
                json!({"name": name, "host": admin.host, "port": admin.port, "capacity": capacity,
                       "max_active_transactions": max_active}),
            ),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// A tenant's JSON; `password` (shown once) goes into its connection string.
fn tenant_json(
    control: &Control,
    t: &TenantRow,
    user: Option<&str>,
    password: Option<&str>,
) -> Value {
    let user = user.unwrap_or("owner");
    let auth = match password {
        Some(p) => format!("{user}.{}:{p}", t.id),
        None => format!("{user}.{}", t.id),
    };
    let mut v = serde_json::to_value(t).expect("a tenant serializes");
    let o = v.as_object_mut().expect("an object");
    o.insert("endpoint".into(), json!(t.id));
    // Opaque physical names (operators look them up here; the tenant never needs them).
    o.insert(
        "backend".into(),
        json!({"database": t.backend_database, "role": t.backend_role}),
    );
    o.insert(
        "connection_string".into(),
        json!(format!(
            "postgres://{auth}@{}/{}",
            public_address(control),
            t.database
        )),
    );
    v
}

async fn get_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match control.catalog.tenant(&id).await {
        Ok(Some(t)) => Json(tenant_json(&control, &t, None, None)).into_response(),
        Ok(None) => not_found(format!("no tenant \"{id}\"")),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<i64>,
}

async fn list_tenants(
    State(proxy): State<Arc<Proxy>>,
    headers: HeaderMap,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Ok(Query(page)) = page else {
        return invalid(vec![(
            "query".into(),
            "after must be a tenant id, limit a number".into(),
        )]);
    };
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return invalid(vec![("limit".into(), "must be 1..1000".into())]);
    }
    match control.catalog.tenants(page.after.as_deref(), limit).await {
        Ok(rows) => {
            let next = (rows.len() as i64 == limit).then(|| rows.last().map(|t| t.id.clone()));
            let items: Vec<Value> = rows
                .iter()
                .map(|t| tenant_json(&control, t, None, None))
                .collect();
            Json(json!({"tenants": items, "next_after": next.flatten()})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn put_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let spec = Value::Object(body.clone());
    let mut problems = Vec::new();
    if !valid_label(&id, 40) {
        problems.push((
            "id".into(),
            "must be 1..40 characters: a-z, 0-9 and '-' (not at either end, no '--')".into(),
        ));
    }
    let plan = string_field(&mut body, "plan", &mut problems).unwrap_or_else(|| "free".into());
    let cluster = string_field(&mut body, "cluster", &mut problems);
    let database =
        string_field(&mut body, "database", &mut problems).unwrap_or_else(|| "app".into());
    let user = string_field(&mut body, "user", &mut problems).unwrap_or_else(|| "owner".into());
    if !valid_name(&database) {
        problems.push(("database".into(), "must be a lower-case SQL name".into()));
    }
    if !valid_name(&user) {
        problems.push(("user".into(), "must be a lower-case SQL name".into()));
    }
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let req = NewTenant {
        plan,
        cluster,
        database,
        user: user.clone(),
        password: None,
    };
    // In a task of its own: a client that hangs up does not stop provisioning halfway.
    let job = {
        let (control, actor, id, spec) = (
            control.clone(),
            token.name.clone(),
            id.clone(),
            spec.clone(),
        );
        tokio::spawn(async move { tenants::create(&control, &actor, &id, &spec, &req).await })
    };
    let result = match job.await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    match result {
        Ok(Created::Ready {
            tenant,
            password,
            new,
        }) => {
            let status = if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = tenant_json(&control, &tenant, Some(&user), password.as_deref());
            (status, Json(body)).into_response()
        }
        Ok(Created::Existing(tenant)) => {
            Json(tenant_json(&control, &tenant, Some(&user), None)).into_response()
        }
        Ok(Created::Failed { tenant, reason }) => {
            let mut body = tenant_json(&control, &tenant, Some(&user), None);
            body["code"] = json!("provisioning_failed");
            body["message"] = json!(format!(
                "provisioning failed ({reason}); the same request again retries it"
            ));
            (StatusCode::BAD_GATEWAY, Json(body)).into_response()
        }
        Err(CreateError::Invalid(problems)) => invalid(problems),
        Err(e @ CreateError::Conflict(_)) => error(StatusCode::CONFLICT, "conflict", e.to_string()),
        Err(e @ CreateError::NoCluster) => error(StatusCode::CONFLICT, "no_cluster", e.to_string()),
        Err(CreateError::Catalog(e)) => internal(e),
    }
}

async fn delete_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, token) = match authorize(&proxy, &headers, Scope::Admin).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let job = {
        let (control, actor, id) = (control.clone(), token.name.clone(), id.clone());
        tokio::spawn(async move { tenants::delete(&control, &actor, &id).await })
    };
    let result = match job.await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    match result {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(format!("no tenant \"{id}\"")),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "deprovisioning_failed",
            format!("{e}; the tenant stays in state deleting and DELETE again retries"),
        ),
    }
}

/// The tenant, or the 404/503 response.
async fn existing_tenant(control: &Control, id: &str) -> Result<TenantRow, Response> {
    match control.catalog.tenant(id).await {
        Ok(Some(t)) if t.state != "deleting" => Ok(t),
        Ok(_) => Err(not_found(format!("no tenant \"{id}\""))),
        Err(e) => Err(internal(e)),
    }
}

async fn list_users(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = existing_tenant(&control, &id).await {
        return r;
    }
    match control.catalog.users(&id).await {
        Ok(users) => {
            let users: Vec<Value> = users
                .iter()
                .map(|(name, at)| json!({"name": name, "created_at": at}))
                .collect();
            Json(json!({"users": users})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn put_user(
    State(proxy): State<Arc<Proxy>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    if !valid_name(&name) {
        problems.push(("name".into(), "must be a lower-case SQL name".into()));
    }
    let given = string_field(&mut body, "password", &mut problems);
    if given.as_ref().is_some_and(|p| p.len() < 12) {
        problems.push(("password".into(), "must be at least 12 characters".into()));
    }
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let tenant = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let password = given.clone().unwrap_or_else(tenants::random_password);
    let scram = crate::auth::scram::ScramVerifier::generate(&password, 4096).to_string();
    let result = control.catalog.put_user(&id, &name, &scram).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    control
        .catalog
        .audit(
            &token.name,
            "user.put",
            &format!("{id}/{name}"),
            outcome,
            Value::Null,
        )
        .await;
    let new = match result {
        Ok(new) => new,
        Err(e) => return internal(e),
    };
    // This instance uses the new password at once; the others follow the notification.
    if let Err(e) = control.directory.reload(&id).await {
        tracing::warn!(tenant = %id, error = %e, "could not reload the tenant yet");
    }
    let shown = if given.is_some() {
        None
    } else {
        Some(password.as_str())
    };
    let mut body = json!({"tenant": id, "name": name});
    body["connection_string"] =
        tenant_json(&control, &tenant, Some(&name), shown)["connection_string"].clone();
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn delete_user(
    State(proxy): State<Arc<Proxy>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (control, token) = match authorize(&proxy, &headers, Scope::Admin).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = existing_tenant(&control, &id).await {
        return r;
    }
    let result = control.catalog.delete_user(&id, &name).await;
    let outcome = match &result {
        Ok(true) => "ok",
        Ok(false) => "not_found",
        Err(_) => "error",
    };
    control
        .catalog
        .audit(
            &token.name,
            "user.delete",
            &format!("{id}/{name}"),
            outcome,
            Value::Null,
        )
        .await;
    match result {
        Ok(true) => {
            if let Err(e) = control.directory.reload(&id).await {
                tracing::warn!(tenant = %id, error = %e, "could not reload the tenant yet");
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => not_found(format!("no user \"{name}\" in \"{id}\"")),
        Err(e) => internal(e),
    }
}

async fn tenant_pools(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = existing_tenant(&control, &id).await {
        return r;
    }
    let pools: Vec<Value> = proxy
        .pools
        .stats()
        .into_iter()
        .filter(|p| p.tenant == id)
        .map(|p| {
            json!({
                "pool": p.key,
                "cl_active": p.clients_active,
                "cl_waiting": p.clients_waiting,
                "sv_active": p.server_active,
                "sv_idle": p.server_idle,
                "sv_pinned": p.server_pinned,
                "sv_total": p.server_total,
                "maxwait_us": p.max_wait_us,
                "checkouts": p.checkouts,
                "wait_p50_us": p.wait_p50_us,
                "wait_p99_us": p.wait_p99_us,
            })
        })
        .collect();
    Json(json!({"tenant": id, "pools": pools})).into_response()
}

#[derive(Deserialize)]
struct Since {
    since: Option<String>,
}

async fn tenant_usage(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    since: Result<Query<Since>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let since = match since {
        Ok(Query(s)) => s.since,
        Err(_) => None,
    };
    if let Some(s) = &since {
        if humantime::parse_rfc3339_weak(s).is_err() {
            return invalid(vec![(
                "since".into(),
                "must be a time like 2026-11-01T00:00:00Z".into(),
            )]);
        }
    }
    let tenant = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut usage = match control.catalog.usage(&id, since.as_deref()).await {
        Ok(u) => u,
        Err(e) => return internal(e),
    };
    // Counted by this instance and not written yet.
    usage.add(&control.unflushed_usage(&proxy.pools, &id).await);
    let storage = tenant_storage(&control, &tenant).await;
    Json(json!({
        "tenant": id,
        "since": since,
        "connections": usage.connections,
        "queries": usage.requests,
        "transactions": usage.transactions,
        "bytes_in": usage.bytes_in,
        "bytes_out": usage.bytes_out,
        "storage_bytes": storage,
    }))
    .into_response()
}

/// The size of the tenant's databases (None when its cluster cannot be asked).
async fn tenant_storage(control: &Control, t: &TenantRow) -> Option<i64> {
    let databases = control.catalog.tenant_databases(&t.id).await.ok()?;
    let admin = control.catalog.cluster_admin(&t.cluster).await.ok()??;
    let client = admin.connect().await.ok()?;
    let row = client
        .query_one(
            "SELECT COALESCE(sum(pg_database_size(d)), 0)::bigint FROM unnest($1::text[]) d
              WHERE EXISTS (SELECT FROM pg_database WHERE datname = d)",
            &[&databases],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

async fn list_clusters(State(proxy): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let clusters = match control.catalog.clusters().await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let mut out = Vec::new();
    for c in clusters {
        // Healthy: its provisioning login answers within a few seconds.
        let healthy = match control.catalog.cluster_admin(&c.name).await {
            Ok(Some(admin)) => tokio::time::timeout(std::time::Duration::from_secs(3), async {
                match admin.connect().await {
                    Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                    Err(_) => false,
                }
            })
            .await
            .unwrap_or(false),
            _ => false,
        };
        let mut v = json!(c);
        v["healthy"] = json!(healthy);
        out.push(v);
    }
    Json(json!({"clusters": out})).into_response()
}

async fn drain_cluster(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    let draining = match body.remove("draining") {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            problems.push(("draining".into(), "must be true or false".into()));
            true
        }
    };
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let result = control.catalog.set_draining(&name, draining).await;
    let outcome = match &result {
        Ok(true) => "ok",
        Ok(false) => "not_found",
        Err(_) => "error",
    };
    control
        .catalog
        .audit(
            &token.name,
            "cluster.drain",
            &name,
            outcome,
            json!({"draining": draining}),
        )
        .await;
    match result {
        Ok(true) => Json(json!({"name": name, "draining": draining})).into_response(),
        Ok(false) => not_found(format!("no cluster \"{name}\"")),
        Err(e) => internal(e),
    }
}

async fn patch_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    let plan = string_field(&mut body, "plan", &mut problems);
    if plan.is_none() && problems.is_empty() {
        problems.push(("plan".into(), "is required".into()));
    }
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let plan = plan.unwrap_or_default();
    let job = {
        let (control, actor, id) = (control.clone(), token.name.clone(), id.clone());
        tokio::spawn(async move { tenants::change_plan(&control, &actor, &id, &plan).await })
    };
    let result = match job.await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    match result {
        Ok(t) => Json(tenant_json(&control, &t, None, None)).into_response(),
        Err(e @ tenants::ChangeError::NoTenant(_)) => not_found(e.to_string()),
        Err(e @ tenants::ChangeError::NoPlan(_)) => invalid(vec![("plan".into(), e.to_string())]),
        Err(e @ tenants::ChangeError::Failed(_)) => {
            error(StatusCode::BAD_GATEWAY, "change_failed", e.to_string())
        }
    }
}

async fn put_token(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    if !valid_label(&name, 63) {
        problems.push((
            "name".into(),
            "must be a DNS label: a-z, 0-9 and '-'".into(),
        ));
    }
    let scope = string_field(&mut body, "scope", &mut problems);
    if !matches!(scope.as_deref(), Some("admin" | "read")) {
        problems.push(("scope".into(), "must be \"admin\" or \"read\"".into()));
    }
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let scope = scope.unwrap_or_default();
    // 32 letters and digits: about 190 bits.
    let secret = format!(
        "{}{}",
        tenants::random_password(),
        &tenants::random_password()[..8]
    );
    let result = control
        .catalog
        .put_token(&name, &secret, &scope, true)
        .await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    control
        .catalog
        .audit(
            &token.name,
            "token.put",
            &name,
            outcome,
            json!({"scope": scope}),
        )
        .await;
    if let Err(e) = result {
        return internal(e);
    }
    control.forget_tokens().await;
    (
        StatusCode::CREATED,
        Json(json!({"name": name, "scope": scope, "token": secret})),
    )
        .into_response()
}

async fn delete_token(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, token) = match authorize(&proxy, &headers, Scope::Admin).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = control.catalog.revoke_token(&name).await;
    let outcome = match &result {
        Ok(true) => "ok",
        Ok(false) => "not_found",
        Err(_) => "error",
    };
    control
        .catalog
        .audit(&token.name, "token.revoke", &name, outcome, Value::Null)
        .await;
    match result {
        Ok(true) => {
            control.forget_tokens().await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => not_found(format!("no token \"{name}\"")),
        Err(e) => internal(e),
    }
}

async fn pause_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    traffic(proxy, id, headers, body, true).await
}

async fn resume_tenant(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    traffic(proxy, id, headers, body, false).await
}

/// Longest wait a pause may ask for.
const MAX_PAUSE_WAIT_MS: u64 = 600_000;

/// Pause (`pause`) or resume a tenant's main database or one of its branches in this instance.
async fn traffic(
    proxy: Arc<Proxy>,
    id: String,
    headers: HeaderMap,
    body: Bytes,
    pause: bool,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    let branch = match body.remove("branch") {
        None => None,
        Some(Value::String(b)) => Some(b),
        Some(_) => {
            problems.push(("branch".into(), "must be a branch name".into()));
            None
        }
    };
    let mut wait = Duration::from_secs(30);
    match body.remove("timeout_ms") {
        None => {}
        Some(v) if pause => match v.as_u64() {
            Some(ms) if (1..=MAX_PAUSE_WAIT_MS).contains(&ms) => wait = Duration::from_millis(ms),
            _ => problems.push((
                "timeout_ms".into(),
                format!("must be an integer from 1 to {MAX_PAUSE_WAIT_MS}"),
            )),
        },
        Some(_) => problems.push(("timeout_ms".into(), "only for a pause".into())),
    }
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let Some(tenant) = proxy.directory.get(&id) else {
        return not_found(format!("no tenant \"{id}\""));
    };
    let database = match tenant.physical_database(branch.as_deref()) {
        Ok(d) => d,
        Err(e) => return not_found(e.to_string()),
    };
    let cluster = &tenant.cluster.name;
    let branch_name = branch.unwrap_or_else(|| "main".into());
    let target = format!("{id}/{branch_name}");
    let (result, action) = if pause {
        let r = match proxy.pools.pause(cluster, &database, wait).await {
            Ok(waited) => Ok(json!({"tenant": id, "branch": branch_name, "paused": true,
                "waited_ms": waited.as_millis() as u64})),
            Err(crate::pool::gate::PauseError::AlreadyPaused) => Err(error(
                StatusCode::CONFLICT,
                "already_paused",
                format!("{target} is already paused"),
            )),
            Err(e @ crate::pool::gate::PauseError::Timeout(_)) => Err(error(
                StatusCode::CONFLICT,
                "pause_timeout",
                format!("{target} was not paused: {e}; traffic goes on"),
            )),
        };
        (r, "tenant.pause")
    } else if let Ok(Some(op)) = branches::running(&control, &id).await {
        // A branch operation may be copying within this pause: resuming now could let writes into the copy.
        (
            Err(error(
                StatusCode::CONFLICT,
                "operation_running",
                format!(
                    "operation {} runs for \"{id}\"; resume when it has ended",
                    op.id
                ),
            )),
            "tenant.resume",
        )
    } else {
        let r = match proxy.pools.resume(cluster, &database) {
            Some(paused) => {
                proxy.telemetry.pause_seconds.record(paused);
                Ok(json!({"tenant": id, "branch": branch_name, "paused": false,
                    "paused_ms": paused.as_millis() as u64}))
            }
            None => Err(error(
                StatusCode::CONFLICT,
                "not_paused",
                format!("{target} is not paused"),
            )),
        };
        (r, "tenant.resume")
    };
    let outcome = if result.is_ok() { "ok" } else { "refused" };
    control
        .catalog
        .audit(&token.name, action, &target, outcome, json!({}))
        .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// Where clients reach this instance, as `host:port` for a URI (an IPv6 address in brackets).
fn public_address(control: &Control) -> String {
    let host = match control.public_host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{}]", control.public_host),
        Err(_) => control.public_host.clone(),
    };
    let port = control
        .public_port
        .load(std::sync::atomic::Ordering::Relaxed);
    format!("{host}:{port}")
}

/// A branch's JSON (its size when known).
fn branch_json(
    control: &Control,
    t: &TenantRow,
    b: &branches::BranchRow,
    size: Option<i64>,
) -> Value {
    let mut v = serde_json::to_value(b).expect("a branch serializes");
    let o = v.as_object_mut().expect("an object");
    let endpoint = format!("{}--{}", t.id, b.name);
    o.insert(
        "connection_string".into(),
        json!(format!(
            "postgres://owner.{endpoint}@{}/{}",
            public_address(control),
            t.database
        )),
    );
    o.insert("endpoint".into(), json!(endpoint));
    o.insert("backend_database".into(), json!(b.backend_database));
    o.insert("size_bytes".into(), json!(size));
    v
}

fn operation_json(op: &branches::Operation) -> Value {
    let mut v = serde_json::to_value(op).expect("an operation serializes");
    v["href"] = json!(format!("/v1/operations/{}", op.id));
    v
}

/// Sizes of databases on a tenant's cluster (empty when it does not answer).
async fn database_sizes(
    control: &Control,
    cluster: &str,
    dbs: Vec<String>,
) -> HashMap<String, i64> {
    let Ok(client) = tenants::cluster_client(control, cluster).await else {
        return HashMap::new();
    };
    client
        .query(
            "SELECT datname::text, pg_database_size(oid) FROM pg_database WHERE datname = ANY($1)",
            &[&dbs],
        )
        .await
        // A database dropped meanwhile (a branch being deleted) has no size: NULL, and it is left out.
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get::<_, Option<i64>>(1).ok()??)))
                .collect()
        })
        .unwrap_or_default()
}

async fn list_branches(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let t = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let list = match branches::list(&control, &id).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let sizes = database_sizes(
        &control,
        &t.cluster,
        list.iter().map(|b| b.backend_database.clone()).collect(),
    )
    .await;
    let items: Vec<Value> = list
        .iter()
        .map(|b| branch_json(&control, &t, b, sizes.get(&b.backend_database).copied()))
        .collect();
    Json(json!({"tenant": id, "branches": items})).into_response()
}

async fn get_branch(
    State(proxy): State<Arc<Proxy>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let t = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match branches::get(&control, &id, &name).await {
        Ok(Some(b)) => {
            let sizes =
                database_sizes(&control, &t.cluster, vec![b.backend_database.clone()]).await;
            Json(branch_json(
                &control,
                &t,
                &b,
                sizes.get(&b.backend_database).copied(),
            ))
            .into_response()
        }
        Ok(None) => not_found(format!("no branch \"{name}\" of \"{id}\"")),
        Err(e) => internal(e),
    }
}

async fn get_operation(
    State(proxy): State<Arc<Proxy>>,
    Path(op): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (control, _) = match authorize(&proxy, &headers, Scope::Read).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match branches::operation(&control, &op).await {
        Ok(Some(o)) => Json(operation_json(&o)).into_response(),
        Ok(None) => not_found(format!("no operation \"{op}\"")),
        Err(e) => internal(e),
    }
}

/// The pause rules of a branch operation's body: `pause_timeout_ms`, `terminate_other_sessions`.
fn pause_rules(
    body: &mut Map<String, Value>,
    problems: &mut Vec<(String, String)>,
) -> (Duration, bool) {
    let mut wait = Duration::from_secs(30);
    match body.remove("pause_timeout_ms") {
        None => {}
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_PAUSE_WAIT_MS).contains(&ms) => wait = Duration::from_millis(ms),
            _ => problems.push((
                "pause_timeout_ms".into(),
                format!("must be an integer from 1 to {MAX_PAUSE_WAIT_MS}"),
            )),
        },
    }
    let terminate = match body.remove("terminate_other_sessions") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            problems.push((
                "terminate_other_sessions".into(),
                "must be true or false".into(),
            ));
            false
        }
    };
    (wait, terminate)
}

/// Runs a recorded operation in a task of its own (a caller hanging up does not stop it).
fn spawn_operation(proxy: &Arc<Proxy>, control: Arc<Control>, op: branches::Operation) {
    let proxy = proxy.clone();
    tokio::spawn(async move {
        branches::run(control, &proxy.pools, &proxy.telemetry.pause_seconds, op).await;
    });
}

fn start_error(e: branches::StartError) -> Response {
    match e {
        branches::StartError::Busy(what) => error(
            StatusCode::CONFLICT,
            "operation_running",
            format!("another operation runs for this tenant ({what}); retry when it has ended"),
        ),
        branches::StartError::Conflict(m) => error(StatusCode::CONFLICT, "conflict", m),
        branches::StartError::NotFound(m) => not_found(m),
        branches::StartError::Catalog(e) => internal(e),
    }
}

async fn create_branch(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    let name = match body.remove("name") {
        Some(Value::String(n)) if branches::valid_branch_name(&n) && n != "main" => n,
        Some(Value::String(n)) if n == "main" => {
            problems.push((
                "name".into(),
                "\"main\" is the tenant's own database".into(),
            ));
            String::new()
        }
        None => {
            problems.push(("name".into(), "required".into()));
            String::new()
        }
        Some(_) => {
            problems.push((
                "name".into(),
                "1 to 40 lowercase letters, digits and single dashes, not at either end".into(),
            ));
            String::new()
        }
    };
    let parent = match body.remove("parent") {
        None => "main".to_owned(),
        Some(Value::String(p)) if p == "main" || branches::valid_branch_name(&p) => p,
        Some(_) => {
            problems.push(("parent".into(), "must be \"main\" or a branch name".into()));
            String::new()
        }
    };
    let expires_at = match body.remove("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if humantime::parse_rfc3339_weak(&t).is_ok() => Some(t),
        Some(_) => {
            problems.push(("expires_at".into(), "must be an RFC 3339 time".into()));
            None
        }
    };
    let (pause_timeout, terminate_other_sessions) = pause_rules(&mut body, &mut problems);
    let strategy = match body.remove("strategy") {
        None | Some(Value::Null) => None,
        Some(Value::String(x)) if x.eq_ignore_ascii_case("wal_log") => Some("WAL_LOG"),
        Some(Value::String(x)) if x.eq_ignore_ascii_case("file_copy") => Some("FILE_COPY"),
        Some(_) => {
            problems.push((
                "strategy".into(),
                "must be \"wal_log\" or \"file_copy\"".into(),
            ));
            None
        }
    };
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let t = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = branches::NewBranch {
        name: name.clone(),
        parent,
        expires_at,
        pause_timeout,
        terminate_other_sessions,
        strategy,
    };
    let started = branches::start_create(&control, &id, &req).await;
    let outcome = if started.is_ok() {
        "accepted"
    } else {
        "refused"
    };
    control
        .catalog
        .audit(
            &token.name,
            "branch.create",
            &format!("{id}/{name}"),
            outcome,
            json!({}),
        )
        .await;
    match started {
        Ok(Some((op, new))) => {
            if new {
                spawn_operation(&proxy, control.clone(), op.clone());
            }
            let b = branches::get(&control, &id, &name).await.ok().flatten();
            let branch = b.map(|b| branch_json(&control, &t, &b, None));
            (
                StatusCode::ACCEPTED,
                Json(json!({"operation": operation_json(&op), "branch": branch})),
            )
                .into_response()
        }
        Ok(None) => match branches::get(&control, &id, &name).await {
            Ok(Some(b)) => {
                Json(json!({"branch": branch_json(&control, &t, &b, None)})).into_response()
            }
            Ok(None) => internal("the branch vanished"),
            Err(e) => internal(e),
        },
        Err(e) => start_error(e),
    }
}

async fn delete_branch(
    State(proxy): State<Arc<Proxy>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    branch_change(proxy, id, name, headers, Bytes::new(), "branch.delete").await
}

async fn reset_branch(
    State(proxy): State<Arc<Proxy>>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    branch_change(proxy, id, name, headers, body, "branch.reset").await
}

async fn branch_change(
    proxy: Arc<Proxy>,
    id: String,
    name: String,
    headers: HeaderMap,
    body: Bytes,
    kind: &'static str,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut problems = Vec::new();
    let (pause_timeout, terminate) = pause_rules(&mut body, &mut problems);
    for k in body.keys() {
        problems.push((k.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    if name == "main" {
        return error(
            StatusCode::CONFLICT,
            "conflict",
            "main is the tenant's own database: delete the tenant instead",
        );
    }
    if let Err(r) = existing_tenant(&control, &id).await {
        return r;
    }
    let request = json!({
        "pause_timeout_ms": pause_timeout.as_millis() as u64,
        "terminate_other_sessions": terminate,
    });
    let started = branches::start_change(&control, &id, &name, kind, request).await;
    let outcome = if started.is_ok() {
        "accepted"
    } else {
        "refused"
    };
    control
        .catalog
        .audit(
            &token.name,
            kind,
            &format!("{id}/{name}"),
            outcome,
            json!({}),
        )
        .await;
    match started {
        Ok((op, new)) => {
            if new {
                spawn_operation(&proxy, control.clone(), op.clone());
            }
            (
                StatusCode::ACCEPTED,
                Json(json!({"operation": operation_json(&op)})),
            )
                .into_response()
        }
        Err(e) => start_error(e),
    }
}

async fn reload(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let (control, token, body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some(k) = body.keys().next() {
        return invalid(vec![(k.clone(), "unknown field".into())]);
    }
    let result = proxy.reload();
    let outcome = if result.is_ok() {
        "ok"
    } else {
        "invalid_config"
    };
    control
        .catalog
        .audit(
            &token.name,
            "instance.reload",
            &control.instance,
            outcome,
            json!({}),
        )
        .await;
    match result {
        Ok(r) => Json(serde_json::to_value(r).expect("serializes")).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", e),
    }
}

async fn list_plans(State(proxy): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    let control = match authorize(&proxy, &headers, Scope::Read).await {
        Ok((c, _)) => c,
        Err(r) => return r,
    };
    match control.catalog.plans().await {
        Ok(plans) => Json(json!({ "plans": plans })).into_response(),
        Err(e) => internal(e),
    }
}

async fn get_plan(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let control = match authorize(&proxy, &headers, Scope::Read).await {
        Ok((c, _)) => c,
        Err(r) => return r,
    };
    match control.catalog.plans().await {
        Ok(plans) => match plans.into_iter().find(|p| p.name == name) {
            Some(p) => Json(json!(p)).into_response(),
            None => not_found(format!("no plan \"{name}\"")),
        },
        Err(e) => internal(e),
    }
}

async fn put_plan(
    State(proxy): State<Arc<Proxy>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let current = match control.catalog.plans().await {
        Ok(plans) => plans.into_iter().find(|p| p.name == name),
        Err(e) => return internal(e),
    };
    let mut problems = Vec::new();
    if !valid_label(&name, 63) {
        problems.push((
            "name".into(),
            "must be a DNS label: a-z, 0-9 and '-'".into(),
        ));
    }
    let mut number = |key: &str, default: i32, min: i64| -> i32 {
        match body.remove(key) {
            None | Some(Value::Null) => default,
            Some(Value::Number(n)) => match n
                .as_i64()
                .filter(|v| *v >= min)
                .and_then(|v| i32::try_from(v).ok())
            {
                Some(v) => v,
                None => {
                    problems.push((key.into(), format!("must be a number of at least {min}")));
                    default
                }
            },
            Some(_) => {
                problems.push((key.into(), "must be a number".into()));
                default
            }
        }
    };
    let row = current.clone().unwrap_or(crate::catalog::store::PlanRow {
        name: name.clone(),
        max_connections: 100,
        pool_size: 10,
        max_branches: 10,
        spec: json!({}),
    });
    let max_connections = number("max_connections", row.max_connections, 1);
    let pool_size = number("pool_size", row.pool_size, 1);
    let max_branches = number("max_branches", row.max_branches, 0);
    let spec = match body.remove("spec") {
        None => row.spec.clone(),
        Some(spec) => {
            match serde_json::from_value::<crate::policy::Plan>(spec.clone()) {
                Ok(plan) => {
                    for p in plan.problems() {
                        problems.push(("spec".into(), p));
                    }
                }
                Err(e) => problems.push(("spec".into(), e.to_string())),
            }
            spec
        }
    };
    for key in body.keys() {
        problems.push((key.clone(), "unknown field".into()));
    }
    if !problems.is_empty() {
        return invalid(problems);
    }
    let new = crate::catalog::store::PlanRow {
        name: name.clone(),
        max_connections,
        pool_size,
        max_branches,
        spec,
    };
    if let Err(e) = control.catalog.put_plan(new.clone()).await {
        return internal(e);
    }
    control
        .catalog
        .audit(&token.name, "plan.put", &name, "ok", json!(new))
        .await;
    let status = if current.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, Json(json!(new))).into_response()
}

async fn set_read_only(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (control, token, mut body) = match admin_request(&proxy, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let on = match body.remove("read_only") {
        Some(Value::Bool(b)) => b,
        _ => {
            return invalid(vec![(
                "read_only".into(),
                "is required: true or false".into(),
            )])
        }
    };
    if let Err(r) = existing_tenant(&control, &id).await {
        return r;
    }
    match control.catalog.set_read_only(&id, on).await {
        Ok(true) => {}
        Ok(false) => return not_found(format!("no tenant \"{id}\"")),
        Err(e) => return internal(e),
    }
    control
        .catalog
        .audit(
            &token.name,
            "tenant.read_only",
            &id,
            "ok",
            json!({ "read_only": on }),
        )
        .await;
    Json(json!({ "tenant": id, "read_only": on })).into_response()
}

async fn tenant_policy(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let control = match authorize(&proxy, &headers, Scope::Read).await {
        Ok((c, _)) => c,
        Err(r) => return r,
    };
    let tenant = match existing_tenant(&control, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let state = proxy.tenant_states.get(&id);
    let plan = state
        .as_ref()
        .map(|s| s.plan())
        .or_else(|| proxy.directory.get(&id).map(|t| t.plan.clone()));
    let refusals = state.as_ref().map(|s| s.refusal_log()).unwrap_or_default();
    let recent: Vec<Value> = refusals
        .recent
        .iter()
        .map(|(at, rule, fingerprint)| json!({"at": at, "rule": rule, "statement": fingerprint}))
        .collect();
    Json(json!({
        "tenant": id,
        "plan": tenant.plan,
        "spec": plan.map(|p| json!(*p)),
        "read_only": state.as_ref().and_then(|s| s.with_plan(|p| s.read_only(p))),
        "storage_bytes": state.as_ref().map(|s| s.storage_bytes.load(std::sync::atomic::Ordering::Relaxed)),
        "month_queries": state.as_ref().map(|s| s.month_queries()),
        "client_connections": state.as_ref().map(|s| s.connections()),
        "refusals": refusals.by_rule,
        "recent_refusals": recent,
        "top_statements": state.as_ref().map(|s| {
            s.top_statements(20)
                .into_iter()
                .map(|(fp, st)| {
                    json!({
                        "statement": &*fp,
                        "calls": st.calls,
                        "total_ms": st.total_us as f64 / 1000.0,
                        "mean_ms": st.total_us as f64 / 1000.0 / st.calls.max(1) as f64,
                        "rows": st.rows,
                    })
                })
                .collect::<Vec<_>>()
        }),
    }))
    .into_response()
}
