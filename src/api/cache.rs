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
//! Requests that miss together share one query: answers are stored under the path, the
//! query and the epoch, and concurrent requests for the same key wait for the one that
//! runs it (the cache coalesces them), so the burst of misses that every commit would
//! otherwise cause (every viewer's next request at once) costs one query, not one each.
//!
//! The key is the path and query alone: an answer depends on nothing else of the request
//! (next/previous links are relative or under the configured public URL, never built from
//! Host or X-Forwarded-*), so one client's answer is right for every other.

use axum::body::Bytes;
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
/// Bytes of cached answers kept at most (least recently used go first).
const CAPACITY_BYTES: u64 = 64 * 1024 * 1024;
/// Larger answers are not kept (a page of the longest list, 1,000 rows, is far below).
const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// What an entry costs beyond its key and body (headers, bookkeeping), so that many small
/// answers (400s, say) cannot hold much more than the capacity.
const ENTRY_OVERHEAD_BYTES: usize = 512;

#[derive(Clone)]
pub struct ResponseCache {
    changes: ChannelWatcher,
    /// By path and query, and the epoch the answer was read in.
    entries: moka::future::Cache<(String, u64), Arc<Entry>>,
}

/// An answer as the handler gave it.
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Entry {
    /// Only complete answers stay: a server error is shared with the requests that waited
    /// for it, never stored for later ones, and a large body is not kept.
    fn keep(&self) -> bool {
        !self.status.is_server_error() && self.body.len() <= MAX_ENTRY_BYTES
    }

    fn to_response(&self) -> Response {
        (self.status, self.headers.clone(), self.body.clone()).into_response()
    }
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
                entries: moka::future::Cache::builder()
                    .max_capacity(CAPACITY_BYTES)
                    .weigher(|key: &(String, u64), entry: &Arc<Entry>| {
                        u32::try_from(key.0.len() + entry.body.len() + ENTRY_OVERHEAD_BYTES)
                            .unwrap_or(u32::MAX)
                    })
                    // Every commit makes new keys: the newest answers must win over the
                    // outdated ones of popular URLs (moka's default admission would not).
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .time_to_live(ttl)
                    .build(),
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for aggregate changes; API responses are not cached");
                None
            }
        }
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
    let key = (key, epoch);
    // An answer that is not to be kept is handed to the requests that waited for it as an
    // error, which the cache never stores.
    let answer = cache
        .entries
        .try_get_with_by_ref(&key, async move {
            let (parts, body) = next.run(request).await.into_parts();
            // The handlers answer with bodies already in memory: collecting them copies
            // nothing.
            let entry = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(body) => Entry {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                },
                Err(error) => {
                    tracing::error!(%error, "cannot buffer a response body");
                    Entry {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        headers: HeaderMap::new(),
                        body: Bytes::new(),
                    }
                }
            };
            let entry = Arc::new(entry);
            match entry.keep() {
                true => Ok(entry),
                false => Err(entry),
            }
        })
        .await;
    match answer {
        Ok(entry) => entry.to_response(),
        Err(entry) => entry.to_response(),
    }
}
