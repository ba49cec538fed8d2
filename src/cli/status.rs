//! `crm-analytics status`: the monitoring points as text or JSON, each database and the
//! queue read on its own; exit code 2 when one of them could not be read.

use std::process::ExitCode;
use std::sync::Arc;

use super::connections::Connections;
use crate::config::DatabaseArgs;
use crate::queue::Queue;
use crate::status::{Report, Unread, READ_TIMEOUT};

pub(super) async fn run(
    db: &DatabaseArgs,
    connections: &Connections,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let queue = open_queue(db, connections).await;
    let unreachable = |error: String| Unread::Unreachable(error);
    // A side read alone (the other failed to connect) is bounded like all together.
    let (crm, analytics, depth) = tokio::join!(
        async {
            match connections.crm_outcome() {
                Ok(pool) => crate::status::read_crm_bounded(pool).await,
                Err(error) => Err(unreachable(error)),
            }
        },
        async {
            match connections.analytics_outcome() {
                Ok(pool) => crate::status::read_analytics_bounded(pool).await,
                Err(error) => Err(unreachable(error)),
            }
        },
        async {
            match &queue {
                Ok(queue) => crate::status::read_queue_bounded(&**queue).await,
                Err(unread) => Err(unread.clone()),
            }
        }
    );
    let report = Report {
        crm,
        analytics,
        queue: depth,
        queue_backend: match &queue {
            Ok(queue) => queue.backend().to_string(),
            Err(_) => db.queue_spec().backend_name(),
        },
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&as_json(&report))?);
    } else {
        print_text(&report);
    }
    let mut down = false;
    let databases = [
        ("crm", db.crm_setting(), report.crm.as_ref().err()),
        (
            "analytics",
            db.analytics_setting(),
            report.analytics.as_ref().err(),
        ),
    ];
    for (name, setting, error) in databases {
        if let Some(error) = error {
            let state = error.state();
            eprintln!("error: the {name} database ({setting}) is {state}: {error}");
            down = true;
        }
    }
    if let Err(error) = &report.queue {
        let (backend, state) = (&report.queue_backend, error.state());
        eprintln!("error: the queue ({backend}, CRM_ANALYTICS_QUEUE) is {state}: {error}");
        down = true;
    }
    Ok(if down {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The queue the settings name, opened within READ_TIMEOUT. The embedded queue lives in
/// the analytics database and is down with it; a broker is opened even then (over a pool
/// that never connects), so that its own state is reported.
async fn open_queue(
    db: &DatabaseArgs,
    connections: &Connections,
) -> Result<Arc<dyn Queue>, Unread> {
    let lazy;
    let analytics = match connections.analytics_outcome() {
        Ok(pool) => pool,
        Err(_) if db.queue_spec().lives_in_analytics_database() => {
            return Err(Unread::Unreachable(
                "it is in the analytics database, which is unreachable".into(),
            ))
        }
        Err(_) => {
            let url = db
                .analytics_url()
                .map_err(|e| Unread::Unreachable(format!("{e:#}")))?;
            lazy = crate::db::connect_lazy(url, db.analytics_setting(), 1)
                .map_err(|e| Unread::Unreachable(format!("{e:#}")))?;
            &lazy
        }
    };
    let options = crate::queue::QueueOptions {
        consumes: false,
        creates: false,
        ..db.queue.options(u64::MAX)
    };
    let spec = match crate::queue::resolve(db, analytics).await {
        Ok(spec) => spec,
        Err(error) => return Err(Unread::Unreachable(format!("cannot read it: {error}"))),
    };
    let opening = crate::queue::open(&spec, analytics, &options);
    match tokio::time::timeout(READ_TIMEOUT, opening).await {
        Ok(Ok(queue)) => Ok(queue),
        Ok(Err(error)) => Err(Unread::Unreachable(format!("cannot open it: {error}"))),
        Err(_) => Err(Unread::Unreachable(format!(
            "it did not open within {READ_TIMEOUT:?}"
        ))),
    }
}

fn state<T>(read: &Result<T, Unread>) -> &'static str {
    match read {
        Ok(_) => "up",
        Err(unread) => unread.state(),
    }
}

fn as_json(report: &Report) -> serde_json::Value {
    let lag = report.crm.as_ref().ok();
    let analytics = report.analytics.as_ref().ok();
    let depth = report.queue.as_ref().ok();
    serde_json::json!({
        "outbox_lag": lag.map(|l| l.events),
        "outbox_lag_estimated": lag.map(|l| l.estimated),
        "queue_backend": report.queue_backend,
        "queue_depth": depth.map(|d| d.events),
        "queue_depth_approximate": depth.map(|d| d.approximate),
        "failed_events": analytics.map(|a| a.failed_events),
        "latency_ms": analytics.and_then(|a| a.latency_ms.clone()),
        "databases": {
            "crm": state(&report.crm),
            "analytics": state(&report.analytics),
            "queue": state(&report.queue),
        },
    })
}

fn print_text(report: &Report) {
    match &report.crm {
        Ok(lag) if lag.estimated => {
            println!("outbox lag     about {} events (estimate)", lag.events)
        }
        Ok(lag) => println!("outbox lag     {} events", lag.events),
        Err(_) => println!("outbox lag     unknown"),
    }
    println!(
        "queue          {}, {}",
        report.queue_backend,
        state(&report.queue)
    );
    match &report.queue {
        // The broker's own estimate (SQS): said so, as for the outbox lag.
        Ok(depth) if depth.approximate => {
            println!("queue depth    about {} events (estimate)", depth.events)
        }
        Ok(depth) => println!("queue depth    {} events", depth.events),
        Err(_) => println!("queue depth    unknown"),
    }
    match &report.analytics {
        Ok(a) => {
            println!("failed events  {}", a.failed_events);
            match &a.latency_ms {
                Some(l) => println!(
                    "latency        p50 {} ms, p99 {} ms (last 5 minutes)",
                    l.p50, l.p99
                ),
                None => println!("latency        no events in the last 5 minutes"),
            }
        }
        Err(_) => println!("failed events  unknown\nlatency        unknown"),
    }
}
