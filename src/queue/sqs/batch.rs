//! A received SQS batch: its leases kept alive while it is worked on, and settled with
//! batch calls (delete what is done, change the visibility of what is retried).

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::error::{broker, other, retryable_code};
use super::publish::{MAX_BATCH_ENTRIES, PARALLEL_CALLS};
use super::Shared;
use crate::queue::{Delivery, QueueError, ReceivedBatch, Settlement};

/// SQS's longest visibility timeout: 12 hours.
pub(super) const MAX_VISIBILITY_SECONDS: i32 = 12 * 60 * 60;

pub(super) struct SqsBatch {
    shared: Arc<Shared>,
    deliveries: Vec<Delivery>,
    /// The receipt handle of each delivery, by index.
    receipts: Arc<Vec<String>>,
    keepalive: Option<Keepalive>,
}

/// Further tries of a failed visibility extension, [`EXTENSION_RETRY_DELAY`] apart.
const EXTENSION_RETRIES: u32 = 3;
const EXTENSION_RETRY_DELAY: Duration = Duration::from_millis(200);

/// The task that extends the batch's visibility every lease/3 until stopped.
struct Keepalive {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Keepalive {
    /// Stops it and waits for an extension under way, so that no extension lands after
    /// what the caller does next.
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl SqsBatch {
    pub(super) fn new(
        shared: Arc<Shared>,
        deliveries: Vec<Delivery>,
        receipts: Vec<String>,
    ) -> Self {
        let receipts = Arc::new(receipts);
        let keepalive = (!receipts.is_empty()).then(|| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(keep_alive(shared.clone(), receipts.clone(), stop.clone()));
            Keepalive { stop, task }
        });
        Self {
            shared,
            deliveries,
            receipts,
            keepalive,
        }
    }
}

async fn keep_alive(shared: Arc<Shared>, receipts: Arc<Vec<String>>, stop: CancellationToken) {
    // Ticks are counted from the start of the previous extension, not from its answer: a
    // slow server must not stretch the period past the lease (a late tick fires at once).
    let every = Duration::from_secs(shared.lease_seconds as u64) / 3;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let extend = || {
            let entries = receipts.iter().map(|r| (r.as_str(), shared.lease_seconds));
            change_visibility(&shared, entries.collect())
        };
        let mut extended = extend().await;
        // A failed extension is tried again shortly, not a third of a lease later: two
        // failures in a row would otherwise let the lease lapse.
        for _ in 0..EXTENSION_RETRIES {
            if extended.is_ok() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EXTENSION_RETRY_DELAY) => {}
            }
            extended = extend().await;
        }
        if let Err(error) = extended {
            // The messages may come back to another worker; the idempotency ledger makes
            // a second application harmless.
            tracing::warn!(%error, messages = receipts.len(), "cannot extend the SQS visibility of a batch in progress");
        }
    }
}

#[async_trait]
impl ReceivedBatch for SqsBatch {
    fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        if let Some(keepalive) = self.keepalive.take() {
            keepalive.finish().await;
        }
        let count = self.receipts.len();
        let mut visibility: Vec<Option<i32>> = vec![Some(0); count];
        let mut done = Vec::with_capacity(settlement.done.len());
        for index in settlement.done {
            if let Some(slot) = visibility.get_mut(index) {
                *slot = None;
                done.push(self.receipts[index].as_str());
            }
        }
        for (index, delay, _) in settlement.retry {
            if let Some(slot) = visibility.get_mut(index).filter(|slot| slot.is_some()) {
                *slot = Some(visibility_seconds(delay));
            }
        }
        // Deliveries left out go back at once, as if the batch were dropped.
        let changes: Vec<(&str, i32)> = visibility
            .iter()
            .zip(self.receipts.iter())
            .filter_map(|(seconds, receipt)| seconds.map(|s| (receipt.as_str(), s)))
            .collect();
        let (deleted, changed) = tokio::join!(delete(&self.shared, done), async {
            match changes.is_empty() {
                true => Ok(()),
                false => change_visibility(&self.shared, changes).await,
            }
        });
        deleted.and(changed)
    }
}

impl Drop for SqsBatch {
    /// Dropped unsettled: stop extending and make the messages visible again at once, so
    /// that they are redelivered without waiting for the lease to run out.
    fn drop(&mut self) {
        let Some(keepalive) = self.keepalive.take() else {
            return;
        };
        keepalive.stop.cancel();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, receipts) = (self.shared.clone(), self.receipts.clone());
        runtime.spawn(async move {
            keepalive.finish().await;
            let entries = receipts.iter().map(|r| (r.as_str(), 0)).collect();
            if let Err(error) = change_visibility(&shared, entries).await {
                tracing::debug!(%error, "cannot release a dropped SQS batch; it comes back when its lease runs out");
            }
        });
    }
}

/// A retry delay as a visibility timeout: whole seconds, rounded up, at most 12 hours.
pub(super) fn visibility_seconds(delay: Duration) -> i32 {
    let seconds = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    seconds.min(MAX_VISIBILITY_SECONDS as u64) as i32
}

/// Entry codes that mean the receipt no longer holds the message: its lease ran out and
/// another consumer received it (SQS then gave that consumer a new receipt), or it is no
/// longer in flight. The message is that consumer's to settle now: a done event is in the
/// ledger, so the other consumer counts it as a duplicate and deletes it; a retried one is
/// retried there. Nothing is lost by leaving it, and failing the batch for it would only
/// make this worker back off while the others finish the work.
const LEASE_LOST_CODES: &[&str] = &["ReceiptHandleIsInvalid", "MessageNotInflight"];

/// What SQS said of one failed entry of a batch call.
struct EntryFailure {
    code: String,
    message: String,
    retryable: bool,
}

impl EntryFailure {
    fn new(code: &str, message: Option<&str>, sender_fault: bool) -> Self {
        Self {
            code: code.to_string(),
            message: message.unwrap_or_default().to_string(),
            retryable: !sender_fault || retryable_code(code),
        }
    }

    /// Whether the entry failed only because this receipt's lease is over (see
    /// [`LEASE_LOST_CODES`]).
    fn lease_lost(&self) -> bool {
        lease_lost(&self.code)
    }
}

/// Whether an entry's error code says only that this receipt's lease is over (see
/// [`LEASE_LOST_CODES`]), with or without the service's prefix.
pub fn lease_lost(code: &str) -> bool {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    LEASE_LOST_CODES.contains(&code)
}

/// Runs `call` on chunks of 10 items, at most [`PARALLEL_CALLS`] at a time, and reports
/// the entries that failed (a lost lease is not a failure): every call is made even when
/// one fails, so that as much as possible is settled.
async fn in_batches<'a, T, F, Fut>(
    operation: &'static str,
    items: &'a [T],
    call: F,
) -> Result<(), QueueError>
where
    F: Fn(&'a [T]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<EntryFailure>, QueueError>>,
{
    // The calls are built up front (futures do nothing until polled): a closure inside the
    // stream would have to be proven Send for every lifetime, which the compiler cannot.
    let calls: Vec<_> = items
        .chunks(MAX_BATCH_ENTRIES)
        .map(|chunk| {
            let answer = call(chunk);
            async move { (chunk.len(), answer.await) }
        })
        .collect();
    let mut calls = futures::stream::iter(calls).buffer_unordered(PARALLEL_CALLS);
    let (mut failed, mut first, mut retryable, mut call_error) = (0, None, true, None);
    let mut leases_lost = 0;
    while let Some((entries, answer)) = calls.next().await {
        match answer {
            Ok(failures) => {
                let (lost, failures): (Vec<_>, Vec<_>) =
                    failures.into_iter().partition(EntryFailure::lease_lost);
                leases_lost += lost.len();
                failed += failures.len();
                retryable &= failures.iter().all(|f| f.retryable);
                if first.is_none() {
                    first = failures.into_iter().next();
                }
            }
            Err(error) => {
                failed += entries;
                call_error.get_or_insert(error);
            }
        }
    }
    if leases_lost > 0 {
        tracing::debug!(
            operation,
            messages = leases_lost,
            "leases ran out before settling; the consumers that hold the messages now settle them"
        );
    }
    if let Some(error) = call_error {
        return Err(error);
    }
    match first {
        None => Ok(()),
        Some(first) => Err(other(
            operation,
            format!(
                "{failed} of {} entries failed, first: {}: {}",
                items.len(),
                first.code,
                first.message
            ),
            retryable,
        )),
    }
}

/// DeleteMessageBatch for every receipt.
async fn delete(shared: &Shared, receipts: Vec<&str>) -> Result<(), QueueError> {
    const OPERATION: &str = "DeleteMessageBatch";
    in_batches(OPERATION, &receipts, |chunk| async move {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*receipt)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| other(OPERATION, e.to_string(), false))?;
        let answer = shared
            .client
            .delete_message_batch()
            .queue_url(&shared.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| broker(OPERATION, e))?;
        Ok(answer
            .failed()
            .iter()
            .map(|f| EntryFailure::new(f.code(), f.message(), f.sender_fault()))
            .collect())
    })
    .await
}

/// ChangeMessageVisibilityBatch: each receipt's message becomes visible in its seconds.
pub(super) async fn change_visibility(
    shared: &Shared,
    entries: Vec<(&str, i32)>,
) -> Result<(), QueueError> {
    const OPERATION: &str = "ChangeMessageVisibilityBatch";
    in_batches(OPERATION, &entries, |chunk| async move {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, (receipt, seconds))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*receipt)
                    .visibility_timeout(*seconds)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| other(OPERATION, e.to_string(), false))?;
        let answer = shared
            .client
            .change_message_visibility_batch()
            .queue_url(&shared.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| broker(OPERATION, e))?;
        Ok(answer
            .failed()
            .iter()
            .map(|f| EntryFailure::new(f.code(), f.message(), f.sender_fault()))
            .collect())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_round_up_to_seconds_and_stop_at_twelve_hours() {
        assert_eq!(visibility_seconds(Duration::ZERO), 0);
        assert_eq!(visibility_seconds(Duration::from_millis(1)), 1);
        assert_eq!(visibility_seconds(Duration::from_millis(2000)), 2);
        assert_eq!(visibility_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(visibility_seconds(Duration::from_secs(86_400)), 43_200);
        assert_eq!(visibility_seconds(Duration::MAX), 43_200);
    }

    #[test]
    fn a_lost_lease_is_told_apart_from_a_failure_in_either_dialect() {
        let lost = |code: &str| EntryFailure::new(code, None, true).lease_lost();
        assert!(lost("ReceiptHandleIsInvalid"));
        assert!(lost("AWS.SimpleQueueService.MessageNotInflight"));
        assert!(!lost("InternalError"));
        assert!(!lost("AccessDenied"));
    }
}
