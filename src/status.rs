//! Status: the original design's monitoring points, read from the databases and the queue
//! so that any process (the CLI, the API) can report them: outbox lag, queue depth, failed
//! events and commit-to-applied latency. Each database and the queue are read on their
//! own, so one being down never hides the others' numbers (a broker that is down does not
//! make the analytics database look down), and the outbox lag costs O(1) however large
//! the backlog.

use serde::Serialize;
use sqlx::PgPool;

use crate::queue::{Depth, Queue};
use crate::worker::apply::latency_bucket_bounds;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Events committed in the CRM and not yet handed to the queue.
    pub outbox_lag: u64,
    /// Whether outbox_lag is an estimate (above EXACT_LAG_LIMIT events) rather than a count.
    pub outbox_lag_estimated: bool,
    /// Events in the queue, waiting or being applied.
    pub queue_depth: u64,
    /// Whether queue_depth is the broker's estimate rather than a count.
    pub queue_depth_approximate: bool,
    /// Events parked in failed_events.
    pub failed_events: u64,
    /// Commit-to-applied latency over the last five minutes; None without events.
    pub latency_ms: Option<Latency>,
}

/// Up to this many outbox rows the lag is counted; beyond, PostgreSQL's own live-row
/// statistics estimate it. A poll (every dashboard viewer, every scrape) thus reads at
/// most this many rows of the CRM, however large a backlog grows.
pub const EXACT_LAG_LIMIT: i64 = 1000;
/// How long one database (or the queue) may take to answer before it is reported
/// unreachable, so that a scrape or a health check answers even while one hangs.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The outbox lag in O(1): exact below EXACT_LAG_LIMIT, an estimate above.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct OutboxLag {
    pub events: u64,
    pub estimated: bool,
}

/// What the CRM database told.
pub async fn read_crm(crm: &PgPool) -> Result<OutboxLag, sqlx::Error> {
    let (counted, live): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM crm_analytics.event_outbox LIMIT $1) s),
                pg_stat_get_live_tuples('crm_analytics.event_outbox'::regclass)",
    )
    .bind(EXACT_LAG_LIMIT + 1)
    .fetch_one(crm)
    .await?;
    Ok(if counted <= EXACT_LAG_LIMIT {
        OutboxLag {
            events: counted as u64,
            estimated: false,
        }
    } else {
        // The statistics trail commits by up to about a second: never below what was seen.
        OutboxLag {
            events: counted.max(live) as u64,
            estimated: true,
        }
    })
}

/// What the analytics database told.
#[derive(Debug, Clone, Serialize)]
pub struct AnalyticsStatus {
    pub failed_events: u64,
    pub latency_ms: Option<Latency>,
}

pub async fn read_analytics(analytics: &PgPool) -> anyhow::Result<AnalyticsStatus> {
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
        .fetch_one(analytics)
        .await?;
    let histogram: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT bucket, sum(events)::int8 FROM crm_analytics.latency_histogram
         WHERE minute >= date_trunc('minute', now()) - interval '4 minutes'
         GROUP BY bucket ORDER BY bucket",
    )
    .fetch_all(analytics)
    .await?;
    Ok(AnalyticsStatus {
        failed_events: failed as u64,
        latency_ms: percentiles(&histogram),
    })
}

/// What the queue told: its depth, exact or estimated.
pub async fn read_queue(queue: &dyn Queue) -> anyhow::Result<Depth> {
    Ok(queue.depth().await?)
}

/// Why one database's side (or the queue) could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Unread {
    /// Every connection of this process's pool was in use and none came free in time: the
    /// database answers the stages holding them, only this read had to wait. Not an outage.
    Busy(String),
    /// The database failed or did not answer.
    Unreachable(String),
}

impl Unread {
    /// "busy" or "unreachable", as health and `status --json` show it.
    pub fn state(&self) -> &'static str {
        match self {
            Unread::Busy(_) => "busy",
            Unread::Unreachable(_) => "unreachable",
        }
    }
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::Busy(detail) | Unread::Unreachable(detail) => f.write_str(detail),
        }
    }
}

/// Each database's side and the queue on their own: one being down leaves the others'
/// numbers readable.
#[derive(Debug)]
pub struct Report {
    /// The CRM's outbox lag, or why it could not be read.
    pub crm: Result<OutboxLag, Unread>,
    /// The analytics side, or why it could not be read.
    pub analytics: Result<AnalyticsStatus, Unread>,
    /// The queue's depth, or why it could not be read.
    pub queue: Result<Depth, Unread>,
    /// The queue's backend (postgres, sqs, nats), as [`Queue::backend`] names it.
    pub queue_backend: String,
}

impl Report {
    /// Both databases and the queue read at once, each within READ_TIMEOUT.
    pub async fn read(crm: &PgPool, analytics: &PgPool, queue: &dyn Queue) -> Self {
        let (crm, analytics, depth) = tokio::join!(
            read_crm_bounded(crm),
            read_analytics_bounded(analytics),
            read_queue_bounded(queue)
        );
        Self {
            crm,
            analytics,
            queue: depth,
            queue_backend: queue.backend().to_string(),
        }
    }

    /// The names of the databases that did not answer ("crm", "analytics"); a busy pool
    /// is not among them, nor the queue (see [`Report::queue_unreachable`]).
    pub fn unreachable(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if matches!(self.crm, Err(Unread::Unreachable(_))) {
            names.push("crm");
        }
        if matches!(self.analytics, Err(Unread::Unreachable(_))) {
            names.push("analytics");
        }
        names
    }

    /// Whether the queue did not answer (a busy pool it shares is not an outage).
    pub fn queue_unreachable(&self) -> bool {
        matches!(self.queue, Err(Unread::Unreachable(_)))
    }

    /// Whether every database and the queue answered or were merely busy.
    pub fn all_reachable(&self) -> bool {
        self.unreachable().is_empty() && !self.queue_unreachable()
    }

    /// The whole status, or an error naming each database that could not be read.
    pub fn into_status(self) -> anyhow::Result<Status> {
        match (self.crm, self.analytics, self.queue) {
            (Ok(lag), Ok(analytics), Ok(depth)) => Ok(Status {
                outbox_lag: lag.events,
                outbox_lag_estimated: lag.estimated,
                queue_depth: depth.events,
                queue_depth_approximate: depth.approximate,
                failed_events: analytics.failed_events,
                latency_ms: analytics.latency_ms,
            }),
            (crm, analytics, depth) => {
                let mut problems = Vec::new();
                if let Err(error) = crm {
                    problems.push(format!("the CRM database is {}: {error}", error.state()));
                }
                if let Err(error) = analytics {
                    problems.push(format!(
                        "the analytics database is {}: {error}",
                        error.state()
                    ));
                }
                if let Err(error) = depth {
                    problems.push(format!(
                        "the queue ({}) is {}: {error}",
                        self.queue_backend,
                        error.state()
                    ));
                }
                Err(anyhow::anyhow!(problems.join("; ")))
            }
        }
    }
}

/// The CRM side within READ_TIMEOUT.
pub async fn read_crm_bounded(crm: &PgPool) -> Result<OutboxLag, Unread> {
    bounded(Some(crm), async { Ok(read_crm(crm).await?) }).await
}

/// The analytics side within READ_TIMEOUT.
pub async fn read_analytics_bounded(analytics: &PgPool) -> Result<AnalyticsStatus, Unread> {
    bounded(Some(analytics), read_analytics(analytics)).await
}

/// The queue within READ_TIMEOUT; busy rather than unreachable when it waited for the
/// pool it shares with the process (the embedded queue's analytics pool).
pub async fn read_queue_bounded(queue: &dyn Queue) -> Result<Depth, Unread> {
    bounded(queue.shared_pool(), read_queue(queue)).await
}

/// Runs `read` within READ_TIMEOUT. A read that failed or timed out while every
/// connection of `pool` was checked out waited for the pool, not for the database: that
/// is reported as busy, so that a pipeline using all its connections raises no alarm.
/// Without a pool (a broker), a failure or a timeout is the broker's.
async fn bounded<T>(
    pool: Option<&PgPool>,
    read: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Result<T, Unread> {
    let outcome = tokio::time::timeout(READ_TIMEOUT, read).await;
    let max = pool.map_or(0, |pool| pool.options().get_max_connections());
    let saturated = pool.is_some_and(|pool| pool.size() >= max && pool.num_idle() == 0);
    let busy = || {
        Unread::Busy(format!(
            "all {max} connections of the pool are in use and none came free within \
             {READ_TIMEOUT:?}"
        ))
    };
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) if saturated && waited_for_pool(&error) => Err(busy()),
        Ok(Err(error)) => Err(Unread::Unreachable(format!("{error:#}"))),
        Err(_) if saturated => Err(busy()),
        Err(_) => Err(Unread::Unreachable(format!(
            "no answer within {READ_TIMEOUT:?}"
        ))),
    }
}

/// Whether `error` is the pool's acquire timeout (directly or through the queue).
fn waited_for_pool(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        )
    })
}

/// Both databases' and the queue's monitoring points; fails naming what did not answer.
pub async fn read(crm: &PgPool, analytics: &PgPool, queue: &dyn Queue) -> anyhow::Result<Status> {
    Report::read(crm, analytics, queue).await.into_status()
}

/// p50 and p99 from (bucket, count) pairs, to within the bucket width (2 %): the rank's
/// position inside its bucket is interpolated geometrically between the bucket's bounds,
/// rounded to 0.1 ms.
pub fn percentiles(histogram: &[(i32, i64)]) -> Option<Latency> {
    let total: i64 = histogram.iter().map(|(_, n)| n).sum();
    if total <= 0 {
        return None;
    }
    let mut sorted = histogram.to_vec();
    sorted.sort_by(|a, b| {
        let (a, b) = (latency_bucket_bounds(a.0).1, latency_bucket_bounds(b.0).1);
        a.total_cmp(&b)
    });
    let at = |quantile: f64| {
        let rank = (quantile * total as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        for (bucket, n) in &sorted {
            if *n <= 0 {
                continue;
            }
            if seen + n >= rank {
                let (lower, upper) = latency_bucket_bounds(*bucket);
                // The k-th of n events in (lower, upper] sits at the k/n point of the bucket.
                let fraction = (rank - seen) as f64 / *n as f64;
                let value = lower * (upper / lower).powf(fraction);
                return (value * 10.0).round() / 10.0;
            }
            seen += n;
        }
        0.0
    };
    Some(Latency {
        p50: at(0.50),
        p99: at(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::apply::latency_bucket;

    #[test]
    fn percentiles_come_from_the_histogram_buckets() {
        assert_eq!(percentiles(&[]), None);
        // 99 events of ~10 ms and 1 of ~500 ms: the 99th is still fast.
        let fast = latency_bucket(10.0);
        let slow = latency_bucket(500.0);
        let latency = percentiles(&[(fast, 99), (slow, 1)]).unwrap();
        assert!((10.0..=12.5).contains(&latency.p50), "{latency:?}");
        assert!((10.0..=12.5).contains(&latency.p99), "{latency:?}");
        let latency = percentiles(&[(fast, 98), (slow, 2)]).unwrap();
        // Within 2 % of 500 ms (the upper bound of a 25 % bucket used to say 596 ms).
        assert!((490.0..=510.0).contains(&latency.p99), "{latency:?}");
        // Sub-millisecond latencies are told apart too.
        assert!(latency_bucket(0.2) < latency_bucket(0.5));
        assert!(latency_bucket(0.5) < latency_bucket(1.0));
    }

    /// Exact percentiles of a sorted sample, by the same nearest-rank definition.
    fn exact(sorted: &[f64], quantile: f64) -> f64 {
        let rank = (quantile * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_are_within_two_percent_of_the_samples() {
        // Deterministic samples: a narrow cluster (the case a 25 % bucket reported as its
        // upper bound got wrong run after run), a wide spread, and a long tail.
        let cluster: Vec<f64> = (0..1000).map(|i| 10.2 + (i % 37) as f64 * 0.01).collect();
        let spread: Vec<f64> = (0..5000)
            .map(|i| 1.0 + (i as f64 * 0.7919) % 200.0)
            .collect();
        let tail: Vec<f64> = (0..2000)
            .map(|i| {
                if i % 50 == 0 {
                    900.0 + i as f64
                } else {
                    3.0 + (i % 13) as f64 * 0.37
                }
            })
            .collect();
        for mut samples in [cluster, spread, tail] {
            samples.sort_by(f64::total_cmp);
            let mut buckets = std::collections::BTreeMap::<i32, i64>::new();
            for ms in &samples {
                *buckets.entry(latency_bucket(*ms)).or_default() += 1;
            }
            let histogram: Vec<(i32, i64)> = buckets.into_iter().collect();
            let latency = percentiles(&histogram).unwrap();
            for (got, quantile) in [(latency.p50, 0.50), (latency.p99, 0.99)] {
                let want = exact(&samples, quantile);
                let error = (got - want).abs() / want;
                // 2 % of bucket width plus the 0.1 ms rounding.
                assert!(
                    error <= 0.02 + 0.05 / want,
                    "p{}: {got} ms for {want} ms ({:.2} %)",
                    quantile * 100.0,
                    error * 100.0
                );
            }
        }
        // The 10.2-10.56 ms cluster no longer reads as 11.6 ms.
        let cluster = percentiles(&[(latency_bucket(10.3), 600), (latency_bucket(10.5), 400)]);
        assert!(cluster.is_some_and(|l| (10.1..=10.6).contains(&l.p50)));
    }

    #[test]
    fn buckets_of_earlier_versions_read_as_their_upper_bound() {
        // Bucket 10 of the 25 % histogram: (7.45, 9.31] ms.
        let latency = percentiles(&[(10, 7)]).unwrap();
        assert_eq!(latency.p50, 9.3);
    }
}
