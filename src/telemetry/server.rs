//! The metrics listener of a `relay` or `worker` process, which runs no API server:
//! `/metrics` (the same Prometheus exporter and database gauges as the API's) and
//! `/healthz`, nothing else (no data, so no token).

use anyhow::Context;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;

/// Binds `listen` (CRM_ANALYTICS_METRICS_LISTEN) and installs the Prometheus recorder, so
/// that everything the process records from now on shows on /metrics.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen} for /metrics: choose another address with \
             CRM_ANALYTICS_METRICS_LISTEN or --metrics-listen"
        )
    })?;
    super::metrics::prometheus();
    Ok(listener)
}

/// The listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Serves on a bound listener until `shutdown` is cancelled.
pub async fn serve_on(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    super::metrics::prometheus();
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics and /healthz");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn metrics(State(state): State<AppState>) -> Response {
    super::metrics::scrape(&state.crm, &state.analytics, &*state.queue).await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
