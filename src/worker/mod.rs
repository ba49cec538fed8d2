//! Workers: consume batches from the queue and apply them exactly once in effect.
//!
//! Owns the worker pool loop, the per-batch decision (decode, apply, isolate a failing event
//! by splitting the batch, retry with exponential backoff and jitter, park after the last
//! attempt) and the failed-events operations. One bad event never blocks the others;
//! transient failures (timeouts, locks, connections) retry the batch whole and do not
//! count toward parking on the `postgres` queue (brokers count deliveries, so there they do).

pub mod apply;
pub mod failed;

use rand::Rng;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::aggregates::rows::decode;
use crate::event::Envelope;
use crate::queue::{Queue, ReceivedBatch, Settlement};
use crate::telemetry::metrics as telemetry;
use apply::{Applier, ApplyError, Committed, Idempotency, Prepared};
use failed::DeadLetter;
use sqlx::{Connection, PgConnection};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub workers: usize,
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
}

/// Totals of one batch, for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchReport {
    pub received: usize,
    pub applied: usize,
    pub duplicates: usize,
    pub retried: usize,
    pub parked: usize,
}

/// Runs `config.workers` workers until `shutdown` is cancelled; each finishes its batch.
pub async fn run(
    queue: Arc<dyn Queue>,
    applier: Arc<Applier>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..config.workers {
        let (queue, applier, config, shutdown) = (
            queue.clone(),
            applier.clone(),
            config.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { work(worker, &*queue, &applier, &config, &shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

async fn work(
    worker: usize,
    queue: &dyn Queue,
    applier: &Applier,
    config: &WorkerConfig,
    shutdown: &CancellationToken,
) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        // Long poll: returns at once when events are ready, else when one arrives or the
        // poll interval passes. Dropping it on shutdown releases whatever it leased.
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = queue.receive(config.batch_size, config.poll_interval) => received,
        };
        let outcome = match received {
            Ok(batch) if batch.deliveries().is_empty() => continue,
            Ok(batch) => {
                let started = std::time::Instant::now();
                let outcome = handle(batch, applier, config).await;
                if let Ok(report) = &outcome {
                    telemetry::batch_applied(report.received, report.duplicates, started.elapsed());
                    telemetry::events_retried(report.retried);
                    telemetry::events_parked(report.parked);
                }
                outcome
            }
            Err(error) => Err(anyhow::Error::from(error)),
        };
        match outcome {
            Ok(report) => {
                if failures > 0 {
                    tracing::info!(worker, failed_attempts = failures, "batches apply again");
                }
                failures = 0;
                tracing::debug!(worker, ?report, "batch done");
            }
            Err(error) => {
                // The batch was not settled: its events go back to the queue untouched, and
                // their attempts do not count toward parking (the events are not to blame).
                failures = failures.saturating_add(1);
                let pause = backoff(config.retry_backoff, failures).min(TRANSIENT_PAUSE_CAP);
                // A long outage (a lock held for minutes) logs its first failure and then
                // every tenth, not one warning per worker and attempt.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(worker, %error, failed_attempts = failures, pause_ms = pause.as_millis() as u64, "batch failed; will retry it whole");
                } else {
                    tracing::debug!(worker, %error, failed_attempts = failures, pause_ms = pause.as_millis() as u64, "batch failed; will retry it whole");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Longest pause after a transient failure: recovery is noticed within this time once the
/// database, lock or operator lets go.
const TRANSIENT_PAUSE_CAP: Duration = Duration::from_secs(30);

/// Exponential backoff with jitter: uniform in [base/2, base * 2^(attempt-1)], capped.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(300));
    let floor = (base / 2).min(ceiling);
    rand::thread_rng().gen_range(floor..=ceiling)
}

/// A batch's deliveries, decoded: the events to apply, and those that failed already.
struct Decoded {
    prepared: Vec<Prepared>,
    /// Per delivery: the envelope when it parsed (a dead letter keeps what it can).
    envelopes: Vec<Option<Envelope>>,
    /// Deliveries that failed this attempt, with the reason.
    failures: Vec<(usize, String)>,
}

fn decode_all(deliveries: &[crate::queue::Delivery]) -> Decoded {
    let mut decoded = Decoded {
        prepared: Vec::with_capacity(deliveries.len()),
        envelopes: Vec::with_capacity(deliveries.len()),
        failures: Vec::new(),
    };
    for (index, delivery) in deliveries.iter().enumerate() {
        match Envelope::from_json(&delivery.body) {
            Err(error) => {
                decoded.envelopes.push(None);
                decoded
                    .failures
                    .push((index, format!("not an event envelope: {error}")));
            }
            Ok(envelope) => {
                match decode(&envelope) {
                    Ok(event) => decoded.prepared.push(Prepared {
                        index,
                        event,
                        json: delivery.body.clone(),
                    }),
                    Err(error) => decoded.failures.push((index, error)),
                }
                decoded.envelopes.push(Some(envelope));
            }
        }
    }
    decoded
}

/// Processes one received batch and settles it. An error means the batch was left
/// unsettled (the infrastructure failed, not an event) and will be delivered again.
///
/// A batch that offers its own transaction ([`ReceivedBatch::transaction`]: the outbox as
/// the queue) is applied and parked inside it, each attempt of [`apply_isolating`] in a
/// savepoint, and reported once settling has committed it.
pub async fn handle(
    mut batch: Box<dyn ReceivedBatch>,
    applier: &Applier,
    config: &WorkerConfig,
) -> anyhow::Result<BatchReport> {
    let deliveries = batch.deliveries();
    let mut report = BatchReport {
        received: deliveries.len(),
        ..Default::default()
    };
    let Decoded {
        prepared,
        envelopes,
        mut failures,
    } = decode_all(deliveries);

    let refs: Vec<&Prepared> = prepared.iter().collect();
    let mut applied_ok = Vec::new();
    let mut committed = Vec::new();
    let mut outcome = Outcome {
        done: &mut applied_ok,
        failures: &mut failures,
        report: &mut report,
        committed: &mut committed,
    };
    apply_isolating(applier, batch.transaction(), &refs, &mut outcome).await?;

    let mut settlement = Settlement {
        done: applied_ok,
        retry: Vec::new(),
    };
    let mut letters = Vec::new();
    let deliveries = batch.deliveries();
    for (index, error) in failures {
        let attempt = deliveries[index].attempt;
        if attempt >= config.max_attempts {
            letters.push((
                index,
                match &envelopes[index] {
                    Some(envelope) => DeadLetter::from_envelope(envelope, error, attempt),
                    None => DeadLetter::from_raw(
                        deliveries[index].event_id,
                        &deliveries[index].body,
                        error,
                        attempt,
                    ),
                },
            ));
        } else {
            tracing::info!(attempt, %error, "event failed; retrying later");
            settlement
                .retry
                .push((index, backoff(config.retry_backoff, attempt), error));
        }
    }
    if !letters.is_empty() {
        let dead: Vec<DeadLetter> = letters.iter().map(|(_, l)| l.clone()).collect();
        match batch.transaction() {
            Some(tx) => failed::park_in(tx, &dead).await?,
            None => failed::park(&applier.pool, &dead).await?,
        };
        for (index, letter) in letters {
            tracing::warn!(event_id = %letter.event_id, error = %letter.error_message, "event parked in failed_events");
            settlement.done.push(index);
            report.parked += 1;
        }
    }
    report.retried = settlement.retry.len();
    batch.settle(settlement).await?;
    for batch in committed {
        batch.report();
    }
    Ok(report)
}

/// What [`apply_isolating`] found, by delivery index.
struct Outcome<'a> {
    /// Applied (or skipped as duplicates).
    done: &'a mut Vec<usize>,
    /// Rejected by the database, with the reason.
    failures: &'a mut Vec<(usize, String)>,
    report: &'a mut BatchReport,
    /// Applied inside the batch's transaction: reported once it commits.
    committed: &'a mut Vec<Committed>,
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<(), ApplyError>> + Send + 'a>>;

/// Applies `events` in one transaction (or, given the batch's transaction, in a savepoint
/// of it); when the database rejects them, splits them in halves until the failing events
/// stand alone. Transient errors abort the whole batch.
fn apply_isolating<'a>(
    applier: &'a Applier,
    mut within: Option<&'a mut PgConnection>,
    events: &'a [&'a Prepared],
    outcome: &'a mut Outcome<'_>,
) -> Pending<'a> {
    Box::pin(async move {
        if events.is_empty() {
            return Ok(());
        }
        let mut attempts = 0;
        loop {
            let attempt = match within.as_deref_mut() {
                None => applier.apply(events).await,
                Some(tx) => apply_in_savepoint(applier, tx, events, outcome.committed).await,
            };
            match attempt {
                Ok(applied) => {
                    outcome.report.applied += applied.fresh;
                    outcome.report.duplicates += applied.duplicates;
                    outcome.done.extend(events.iter().map(|p| p.index));
                    return Ok(());
                }
                // A deadlock or serialization failure clears up on its own: try again now.
                Err(ApplyError::Conflict(_)) if attempts < 5 => attempts += 1,
                Err(error @ (ApplyError::Conflict(_) | ApplyError::Transient(_))) => {
                    return Err(error)
                }
                Err(ApplyError::Rejected(error)) if events.len() == 1 => {
                    outcome.failures.push((events[0].index, error));
                    return Ok(());
                }
                Err(ApplyError::Rejected(_)) => {
                    // In the batch's transaction, what applies stays locked until the commit:
                    // find the rejected events first, then apply the rest in one pass, so
                    // that the batch locks the rows it shares with others once, in the one
                    // global order (see `Applier::apply`), and only from then on.
                    if let Some(tx) = within.as_deref_mut() {
                        let rejected = probe_rejected(applier, tx, events).await?;
                        if !rejected.is_empty() {
                            let out: HashSet<usize> = rejected.iter().map(|r| r.0).collect();
                            outcome.failures.extend(rejected);
                            let rest: Vec<&Prepared> = events
                                .iter()
                                .copied()
                                .filter(|p| !out.contains(&p.index))
                                .collect();
                            return apply_isolating(applier, within, &rest, outcome).await;
                        }
                        // Rejected together, accepted one by one: halves, as below.
                    }
                    let (left, right) = events.split_at(events.len() / 2);
                    apply_isolating(applier, within.as_deref_mut(), left, outcome).await?;
                    return apply_isolating(applier, within, right, outcome).await;
                }
            }
        }
    })
}

type Probing<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<(usize, String)>, ApplyError>> + Send + 'a>>;

/// The events of `events` the database rejects on their own, found by applying halves in
/// savepoints that are always rolled back (nothing of a probe stays, locks included).
fn probe_rejected<'a>(
    applier: &'a Applier,
    tx: &'a mut PgConnection,
    events: &'a [&'a Prepared],
) -> Probing<'a> {
    Box::pin(async move {
        let mut attempts = 0;
        loop {
            let mut savepoint = tx.begin().await?;
            let probe = applier
                .apply_in(&mut savepoint, events, Idempotency::Removal)
                .await;
            savepoint.rollback().await?;
            match probe {
                Ok(_) => return Ok(Vec::new()),
                Err(ApplyError::Conflict(_)) if attempts < 5 => attempts += 1,
                Err(error @ (ApplyError::Conflict(_) | ApplyError::Transient(_))) => {
                    return Err(error)
                }
                Err(ApplyError::Rejected(error)) if events.len() == 1 => {
                    return Ok(vec![(events[0].index, error)])
                }
                Err(ApplyError::Rejected(_)) => {
                    let (left, right) = events.split_at(events.len() / 2);
                    let mut found = probe_rejected(applier, &mut *tx, left).await?;
                    found.extend(probe_rejected(applier, tx, right).await?);
                    return Ok(found);
                }
            }
        }
    })
}

/// One attempt inside the batch's transaction: a savepoint, released when the events
/// applied, rolled back to when they did not (the transaction stays usable).
async fn apply_in_savepoint(
    applier: &Applier,
    tx: &mut PgConnection,
    events: &[&Prepared],
    committed: &mut Vec<Committed>,
) -> Result<apply::Applied, ApplyError> {
    let mut savepoint = tx.begin().await?;
    match applier
        .apply_in(&mut savepoint, events, Idempotency::Removal)
        .await
    {
        Ok((applied, pending)) => {
            savepoint.commit().await?;
            committed.push(pending);
            Ok(applied)
        }
        Err(error) => {
            savepoint.rollback().await?;
            Err(error)
        }
    }
}
