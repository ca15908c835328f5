//! The operators' HTTP listener (axum), separate from the client listener and on loopback by default:
//! `/healthz` (the process is up), `/readyz` (the client listener accepts connections) and `/metrics` (Prometheus
//! text, see [`crate::telemetry`]). The tenant API of the control plane will live here too.
//!
//! Errors have one JSON shape: `{"code": "...", "message": "..."}`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::server::Proxy;

pub mod v1;

/// The stable error body of every failed admin request.
#[derive(Debug, Serialize)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn response(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Response {
        let body = ApiError {
            code,
            message: message.into(),
        };
        (status, Json(body)).into_response()
    }
}

/// The admin routes over `proxy`.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .merge(v1::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(proxy)
}

/// Serves the admin routes on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) {
    if let Err(e) = axum::serve(listener, router(proxy)).await {
        tracing::error!(error = %e, "the admin listener failed");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    if !proxy.ready.load(Ordering::Relaxed) {
        return ApiError::response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the client listener is not accepting connections",
        );
    }
    if let Some(control) = &proxy.control {
        if !control.directory.following() {
            return ApiError::response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "not following catalog changes (reconnecting to the control database)",
            );
        }
        if !control.catalog.ping().await {
            return ApiError::response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the control database does not answer",
            );
        }
    }
    "ready\n".into_response()
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    let max_series = proxy
        .cfg
        .admin
        .as_ref()
        .map_or(usize::MAX, |a| a.max_pool_series);
    let tenants: Vec<_> = proxy
        .pools
        .usage()
        .into_iter()
        .map(|(t, u)| (t, u.totals()))
        .collect();
    let body = proxy.telemetry.render(
        &proxy.pools.stats(),
        &tenants,
        &proxy.tenant_states.all(),
        proxy.clients_connected(),
        proxy.pools.paused(),
        max_series,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::response(StatusCode::NOT_FOUND, "not_found", "no such route")
}
