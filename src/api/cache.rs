//! Response cache for the metric lists: a dashboard polled by many viewers, or a BI tool
//! re-running the same query, gets the bytes of the last answer until an aggregate changes.
//!
//! Why it stays exact: every change of an aggregate table sends a notification when it
//! commits (statement triggers of analytics migration 3), and the [`ChannelWatcher`] counts
//! them in an epoch. A response is stored under the epoch read *before* its query ran, and
//! served only while the epoch is unchanged, so an answer that might predate a commit is
//! never served after that commit's notification. The time-to-live bounds staleness when
//! notifications are lost (the listening connection broke and has not come back yet).
//!
//! The key is the path and query alone: an answer depends on nothing else of the request
//! (next/previous links are relative or under the configured public URL, never built from
//! Host or X-Forwarded-*), so one client's answer is right for every other.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

use crate::listen::ChannelWatcher;

/// The channel analytics migration 3 notifies on.
pub const CHANNEL: &str = "crm_analytics_aggregates";
/// Bytes of response bodies kept at most (least recently used go first).
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;
/// Larger answers are not kept (a page of the longest list, 1,000 rows, is far below).
const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct ResponseCache {
    changes: ChannelWatcher,
    entries: moka::sync::Cache<String, Arc<Entry>>,
}

struct Entry {
    epoch: u64,
    headers: HeaderMap,
    body: Bytes,
}

impl ResponseCache {
    /// Starts listening for aggregate changes; `None` (with a warning) where the database
    /// cannot LISTEN, e.g. behind a transaction-mode connection pooler.
    pub async fn start(analytics: &PgPool, ttl: Duration) -> Option<Self> {
        if ttl.is_zero() {
            return None;
        }
        match ChannelWatcher::start(analytics, CHANNEL).await {
            Ok(changes) => Some(Self {
                changes,
                entries: moka::sync::Cache::builder()
                    .max_capacity(CAPACITY_BYTES)
                    .weigher(|key: &String, entry: &Arc<Entry>| {
                        u32::try_from(key.len() + entry.body.len()).unwrap_or(u32::MAX)
                    })
                    .time_to_live(ttl)
                    .build(),
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for aggregate changes; API responses are not cached");
                None
            }
        }
    }

    /// A stored answer for `key` that no commit has outdated.
    fn fresh(&self, key: &str, epoch: u64) -> Option<Arc<Entry>> {
        self.entries.get(key).filter(|entry| entry.epoch == epoch)
    }
}

/// Middleware for GET routes whose answers depend only on the URL and the aggregates.
pub async fn serve_cached(
    State(cache): State<Option<ResponseCache>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(cache) = cache.filter(|_| request.method() == Method::GET) else {
        return next.run(request).await;
    };
    let key = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let epoch = cache.changes.epoch(); // before the query: see the module comment
    if let Some(entry) = cache.fresh(&key, epoch) {
        return (StatusCode::OK, entry.headers.clone(), entry.body.clone()).into_response();
    }
    let response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    // The handlers answer with bodies already in memory: collecting them copies nothing.
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => {
            if body.len() <= MAX_ENTRY_BYTES {
                let entry = Entry {
                    epoch,
                    headers: parts.headers.clone(),
                    body: body.clone(),
                };
                cache.entries.insert(key, Arc::new(entry));
            }
            Response::from_parts(parts, Body::from(body))
        }
        Err(error) => {
            tracing::error!(%error, "cannot buffer a response body");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
