//! Metrics: the Prometheus recorder and one function per telemetry event, so that the
//! pipeline's logic says what happened and this file alone decides how it is measured.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("crm_analytics_batch_size".into()),
                    SIZE_BUCKETS,
                )
            });
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; ours then stays silent.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples pile up in the recorder until upkeep folds them into buckets;
        // without it memory grew by about 2 MB a minute at 1,700 events/s when nobody
        // scraped /metrics.
        let upkeep = handle.clone();
        let started = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
        if let Err(error) = started {
            tracing::warn!(%error, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

/// A /metrics response: the backlog gauges read from the databases at each scrape (each
/// database on its own: the outbox lag keeps moving while analytics is down), then
/// everything in the Prometheus text format. The API and the metrics listener both serve it.
pub async fn scrape(
    crm: &sqlx::PgPool,
    analytics: &sqlx::PgPool,
    queue: &dyn crate::queue::Queue,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let report = crate::status::Report::read(crm, analytics, queue).await;
    status_read(&report);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// A batch was applied: its size, how long it took, and what it did.
pub fn batch_applied(received: usize, duplicates: usize, took: Duration) {
    histogram!("crm_analytics_batch_size").record(received as f64);
    histogram!("crm_analytics_batch_duration_seconds").record(took.as_secs_f64());
    counter!("crm_analytics_duplicates_total").increment(duplicates as u64);
}

/// An event was applied for the first time, `latency` after its transaction started.
pub fn event_applied(table: &'static str, operation: &'static str, latency: Duration) {
    counter!("crm_analytics_events_processed_total", "table" => table, "operation" => operation)
        .increment(1);
    histogram!("crm_analytics_event_latency_seconds").record(latency.as_secs_f64());
}

pub fn events_retried(n: usize) {
    counter!("crm_analytics_retries_total").increment(n as u64);
}

pub fn events_parked(n: usize) {
    counter!("crm_analytics_events_failed_total").increment(n as u64);
}

pub fn archive_written(objects: usize) {
    counter!("crm_analytics_archive_objects_total").increment(objects as u64);
}

pub fn events_relayed(n: usize) {
    counter!("crm_analytics_events_relayed_total").increment(n as u64);
}

/// A relay batch that failed (the CRM or the queue did not answer); its events stayed in
/// the outbox. Rising while `events_relayed` stands still: the queue is down.
pub fn relay_failed() {
    counter!("crm_analytics_relay_failures_total").increment(1);
}

/// The databases' and the queue's monitoring points as last read: a gauge per database
/// (and `crm_analytics_queue_up` for the queue) says whether it answered (1) or not (0);
/// the gauges of one that did not answer keep their value.
/// A pool whose connections were all in use says nothing about the database: its `up`
/// gauge keeps its value and `crm_analytics_pool_busy` says so instead.
pub fn status_read(report: &crate::status::Report) {
    use crate::status::Unread;
    let side = |database: &'static str, read: Result<(), &Unread>| {
        let busy = matches!(read, Err(Unread::Busy(_)));
        gauge!("crm_analytics_pool_busy", "database" => database).set(f64::from(u8::from(busy)));
        match read {
            Ok(()) => gauge!("crm_analytics_database_up", "database" => database).set(1.0),
            Err(Unread::Unreachable(_)) => {
                gauge!("crm_analytics_database_up", "database" => database).set(0.0)
            }
            Err(Unread::Busy(_)) => {}
        }
    };
    side("crm", report.crm.as_ref().map(|_| ()));
    side("analytics", report.analytics.as_ref().map(|_| ()));
    if let Ok(lag) = &report.crm {
        gauge!("crm_analytics_outbox_lag").set(lag.events as f64);
    }
    if let Ok(status) = &report.analytics {
        gauge!("crm_analytics_failed_events").set(status.failed_events as f64);
    }
    // The queue on its own: a broker that is down is not the analytics database. Its depth
    // is SQS's estimate where the backend only estimates it (see status and health).
    match &report.queue {
        Ok(depth) => {
            gauge!("crm_analytics_queue_up").set(1.0);
            gauge!("crm_analytics_queue_depth").set(depth.events as f64);
        }
        Err(Unread::Unreachable(_)) => gauge!("crm_analytics_queue_up").set(0.0),
        Err(Unread::Busy(_)) => {}
    }
}
