//! API: the REST API in Django REST Framework's conventions, health and readiness probes,
//! Prometheus metrics, the OpenAPI document and the built-in dashboard, in one axum server.
//!
//! Paths under /api/ end in a slash (the same path without it redirects with 301), lists
//! page with limit/offset, bad input gets 400 `{"detail": ...}`, and every /api/ route but
//! the OpenAPI document needs a bearer token.

pub mod auth;
pub mod cache;
pub mod error;
pub mod models;
pub mod query;
pub mod routes;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Extension, Json, Router};
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::queue::Queue;
use auth::Tokens;
use cache::ResponseCache;
use error::ApiError;
use query::Links;

/// What a server needs besides its connections.
#[derive(Clone)]
pub struct ServeOptions {
    pub tokens: Tokens,
    /// Longest time a cached metric response is served (0: no cache); a commit that changes
    /// the aggregates outdates it at once.
    pub cache_ttl: Duration,
    /// Scheme, host and path prefix for absolute next/previous links; `None`: relative links.
    pub public_url: Option<String>,
}

impl ServeOptions {
    pub fn from_args(server: &crate::config::ServerArgs) -> Self {
        Self {
            tokens: Tokens::parse(&server.api_tokens),
            cache_ttl: server.api_cache_ttl,
            public_url: server.public_url.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub crm: PgPool,
    pub analytics: PgPool,
    pub queue: Arc<dyn Queue>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "crm-analytics",
        description = "Live, exact sales analytics from a PostgreSQL CRM. Lists page with limit/offset; money is a string with two decimals; dates are YYYY-MM-DD, months YYYY-MM."
    ),
    paths(
        routes::daily_metrics,
        routes::funnel_metrics,
        routes::revenue_metrics,
        routes::event_counts,
        routes::health
    ),
    modifiers(&BearerSecurity)
)]
pub struct ApiDoc;

struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The /api/ list and health routes, all behind the token check.
const API_ROUTES: [&str; 5] = [
    "/api/daily-metrics/",
    "/api/funnel-metrics/",
    "/api/revenue-metrics/",
    "/api/event-counts/",
    "/api/health/",
];

/// The whole server. Responses depend on the URL, the configuration and the aggregates only,
/// never on other request headers: that is what lets the cache share them between clients.
pub fn router(
    state: AppState,
    tokens: Tokens,
    cache: Option<ResponseCache>,
    links: Links,
) -> Router {
    // route_layer wraps the routes added before it: the cache sits inside the token check.
    let api = Router::new()
        .route(API_ROUTES[0], get(routes::daily_metrics))
        .route(API_ROUTES[1], get(routes::funnel_metrics))
        .route(API_ROUTES[2], get(routes::revenue_metrics))
        .route(API_ROUTES[3], get(routes::event_counts))
        .route_layer(middleware::from_fn_with_state(cache, cache::serve_cached))
        .route(API_ROUTES[4], get(routes::health))
        .route_layer(middleware::from_fn_with_state(tokens, auth::require_token));
    Router::new()
        .merge(api)
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/", get(crate::dashboard::page))
        .fallback(fallback)
        .layer(Extension(links))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// DRF's APPEND_SLASH: a known route without its slash redirects, keeping the query.
/// The target is under the configured public URL, like the pagination links: behind a
/// proxy that adds a path prefix, a bare `/api/…` would leave it.
async fn fallback(Extension(links): Extension<query::Links>, uri: Uri) -> Response {
    let path = uri.path();
    if !path.ends_with('/') {
        let slashed = format!("{path}/");
        if API_ROUTES.contains(&slashed.as_str()) {
            let target = match uri.query() {
                Some(q) => links.to(&format!("{slashed}?{q}")),
                None => links.to(&slashed),
            };
            // 301 as Django's APPEND_SLASH answers (axum's permanent redirect is a 308).
            return (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, target)]).into_response();
        }
    }
    ApiError::NotFound.into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(document).clone())
}

/// The OpenAPI document as served. Every filter takes an empty value as absent (DRF's
/// convention, what a form with a blank field sends); utoipa has no attribute for OpenAPI's
/// `allowEmptyValue`, so it is added to each query parameter here.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for operation in paths.values_mut().filter_map(|p| p.as_object_mut()) {
            for parameters in operation
                .values_mut()
                .filter_map(|op| op.get_mut("parameters"))
                .filter_map(|p| p.as_array_mut())
            {
                for parameter in parameters.iter_mut().filter_map(|p| p.as_object_mut()) {
                    if parameter.get("in") == Some(&serde_json::json!("query")) {
                        parameter.insert("allowEmptyValue".into(), true.into());
                    }
                }
            }
        }
    }
    doc
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the analytics database answers and the queue is not unreachable (a queue
/// whose shared pool is merely busy is not an outage).
async fn readyz(State(state): State<AppState>) -> Response {
    let (database, queue) = tokio::join!(
        sqlx::query("SELECT 1").execute(&state.analytics),
        crate::status::read_queue_bounded(&*state.queue)
    );
    if let Err(error) = database {
        return ApiError::Unavailable(error.to_string()).into_response();
    }
    if let Err(crate::status::Unread::Unreachable(error)) = queue {
        tracing::warn!(%error, backend = state.queue.backend(), "not ready: the queue is unreachable");
        let detail = serde_json::json!({ "detail": "The queue is not reachable." });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(detail)).into_response();
    }
    Json(serde_json::json!({ "status": "ready" })).into_response()
}

/// Prometheus text format (see [`crate::telemetry::metrics::scrape`]).
async fn prometheus(State(state): State<AppState>) -> Response {
    crate::telemetry::metrics::scrape(&state.crm, &state.analytics, &*state.queue).await
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    state: AppState,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: choose another address with CRM_ANALYTICS_LISTEN or --listen"))?;
    serve_on(listener, state, options, shutdown).await
}

/// Serves on a bound listener (tests bind port 0 and read the port back).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::telemetry::metrics::prometheus();
    let ServeOptions {
        tokens,
        cache_ttl,
        public_url,
    } = options;
    if tokens.is_empty() {
        tracing::warn!("no API tokens configured: every /api/ request will get 401; set CRM_ANALYTICS_API_TOKENS");
    }
    tracing::info!(listen = %listener.local_addr()?, "serving the API, the dashboard and /metrics");
    let cache = ResponseCache::start(&state.analytics, cache_ttl).await;
    let links = Links::new(public_url.as_deref());
    axum::serve(listener, router(state, tokens, cache, links))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
