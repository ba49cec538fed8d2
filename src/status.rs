//! Status: the original design's monitoring points, read from the databases so that any
//! process (the CLI, the API) can report them: outbox lag, queue depth, failed events and
//! commit-to-applied latency.

use serde::Serialize;
use sqlx::PgPool;

use crate::queue::Queue;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Events committed in the CRM and not yet handed to the queue.
    pub outbox_lag: u64,
    /// Events in the queue, waiting or being applied.
    pub queue_depth: u64,
    /// Events parked in failed_events.
    pub failed_events: u64,
    /// Commit-to-applied latency over the last five minutes; None without events.
    pub latency_ms: Option<Latency>,
}

pub async fn read(crm: &PgPool, analytics: &PgPool, queue: &dyn Queue) -> anyhow::Result<Status> {
    let outbox_lag: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(crm)
        .await?;
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
    Ok(Status {
        outbox_lag: outbox_lag as u64,
        queue_depth: queue.depth().await?,
        failed_events: failed as u64,
        latency_ms: percentiles(&histogram),
    })
}

/// p50 and p99 from (bucket, count) pairs, each bucket reported by its upper bound 1.25^b ms.
pub fn percentiles(histogram: &[(i32, i64)]) -> Option<Latency> {
    let total: i64 = histogram.iter().map(|(_, n)| n).sum();
    if total <= 0 {
        return None;
    }
    let at = |quantile: f64| {
        let rank = (quantile * total as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        for (bucket, n) in histogram {
            seen += n;
            if seen >= rank {
                return (1.25f64.powi(*bucket) * 10.0).round() / 10.0;
            }
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
        assert!((500.0..=625.0).contains(&latency.p99), "{latency:?}");
        assert_eq!(latency_bucket(0.2), 0);
    }
}
