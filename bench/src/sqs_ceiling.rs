//! What the SQS server can carry on its own: a plain loop with the AWS SDK on a fresh
//! queue of the same server, with nothing of the pipeline around it. SendMessageBatch of
//! 10 and, at the same time, ReceiveMessage of 10 each followed by its DeleteMessageBatch,
//! each side with as many calls in flight as the SQS backend makes
//! ([`PARALLEL_CALLS`]), on messages that are our events (bodies and attributes as the
//! backend sends them). Receives are short polls, with a short pause after an empty one:
//! on the local SQS-compatible server (moto) concurrent long polls all wake on every
//! message sent and make it several times slower, and the ceiling is the most the server
//! carries. Events/s from the first delete to the last, as the drain is timed
//! from the first applied event to the last: the ceiling the SQS drain is compared with.

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use futures::{StreamExt, TryStreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::brokers::FreshQueue;
use crm_analytics::queue::sqs::{
    lease_lost, SqsQueue, EVENT_ID, EVENT_TYPE, MAX_BATCH_ENTRIES, PARALLEL_CALLS,
};
use crm_analytics::queue::{Message, QueueSpec};

/// Pause after a receive that found nothing (short polls: see the module comment).
const EMPTY_PAUSE: Duration = Duration::from_millis(10);

/// What the loop measured.
pub(super) struct Ceiling {
    pub events_per_second: f64,
    /// Messages deleted: all that were sent, unless the loop was stopped at the cap.
    pub deleted: usize,
}

/// Sends `total` messages (cycling through `messages`) through the fresh queue `queue` and
/// receives and deletes them all, or as many as it can within `cap`.
pub(super) async fn measure(
    queue: &FreshQueue,
    messages: &[Message],
    total: usize,
    cap: Duration,
) -> anyhow::Result<Ceiling> {
    let QueueSpec::Sqs(target) = &queue.spec else {
        anyhow::bail!("the SQS ceiling needs an SQS queue, not {}", queue.spec);
    };
    anyhow::ensure!(!messages.is_empty(), "no messages to send");
    let opened = SqsQueue::open(target, &queue.options).await?;
    let (client, url) = (opened.client().clone(), opened.url().to_string());
    let progress = Progress::default();
    let sending = send_all(&client, &url, messages, total);
    let receiving = receive_all(&client, &url, total, &progress);
    // Stopped at the cap, the calls under way are dropped and the rate is what came so far.
    if let Ok(done) =
        tokio::time::timeout(cap, async { tokio::try_join!(sending, receiving) }).await
    {
        done?;
    }
    let deleted = progress.deleted.load(Ordering::Relaxed).min(total);
    let Some(&(first, before)) = progress.first.get() else {
        return Ok(Ceiling {
            events_per_second: 0.0,
            deleted,
        });
    };
    let last = progress.last.get().copied().unwrap_or_else(Instant::now);
    anyhow::ensure!(
        deleted > before && last > first,
        "{deleted} messages were deleted in one call: too few to time"
    );
    Ok(Ceiling {
        events_per_second: (deleted - before) as f64 / (last - first).as_secs_f64(),
        deleted,
    })
}

/// Messages deleted so far, when the first call deleted (and how many) and when the last.
#[derive(Default)]
struct Progress {
    deleted: AtomicUsize,
    first: OnceLock<(Instant, usize)>,
    last: OnceLock<Instant>,
}

/// Every message in SendMessageBatch calls of 10, [`PARALLEL_CALLS`] in flight.
async fn send_all(
    client: &Client,
    url: &str,
    messages: &[Message],
    total: usize,
) -> anyhow::Result<()> {
    let batches = (0..total).step_by(MAX_BATCH_ENTRIES).map(|start| {
        (start..(start + MAX_BATCH_ENTRIES).min(total))
            .map(|i| &messages[i % messages.len()])
            .collect::<Vec<_>>()
    });
    futures::stream::iter(batches)
        .map(|batch| send(client, url, batch))
        .buffer_unordered(PARALLEL_CALLS)
        .try_for_each(|()| async { Ok(()) })
        .await
}

async fn send(client: &Client, url: &str, batch: Vec<&Message>) -> anyhow::Result<()> {
    let mut entries = Vec::with_capacity(batch.len());
    for (index, message) in batch.iter().enumerate() {
        entries.push(
            SendMessageBatchRequestEntry::builder()
                .id(index.to_string())
                .message_body(&message.body)
                .message_attributes(EVENT_ID, attribute(&message.event_id.to_string())?)
                .message_attributes(EVENT_TYPE, attribute(&message.event_type)?)
                .build()?,
        );
    }
    let sent = client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await?;
    anyhow::ensure!(
        sent.failed().is_empty(),
        "SendMessageBatch refused {} messages",
        sent.failed().len()
    );
    Ok(())
}

fn attribute(value: &str) -> anyhow::Result<MessageAttributeValue> {
    Ok(MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()?)
}

/// [`PARALLEL_CALLS`] loops of ReceiveMessage (10, with the attributes the backend asks
/// for) and DeleteMessageBatch, until `total` messages were deleted.
async fn receive_all(
    client: &Client,
    url: &str,
    total: usize,
    progress: &Progress,
) -> anyhow::Result<()> {
    let loops = (0..PARALLEL_CALLS).map(|_| receive_loop(client, url, total, progress));
    futures::future::try_join_all(loops).await?;
    Ok(())
}

async fn receive_loop(
    client: &Client,
    url: &str,
    total: usize,
    progress: &Progress,
) -> anyhow::Result<()> {
    while progress.deleted.load(Ordering::Relaxed) < total {
        let received = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(MAX_BATCH_ENTRIES as i32)
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names(EVENT_ID)
            .message_attribute_names(EVENT_TYPE)
            .send()
            .await?;
        let mut entries = Vec::new();
        for (index, message) in received.messages().iter().enumerate() {
            if let Some(receipt) = message.receipt_handle() {
                entries.push(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(index.to_string())
                        .receipt_handle(receipt)
                        .build()?,
                );
            }
        }
        if entries.is_empty() {
            tokio::time::sleep(EMPTY_PAUSE).await;
            continue;
        }
        let answer = client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await?;
        // As in the backend: a receipt whose lease is over means that another loop received
        // the message again (the local server does so under concurrent receives) and deletes
        // it there; only the messages this call deleted are counted.
        let refused = answer
            .failed()
            .iter()
            .filter(|f| !lease_lost(f.code()))
            .count();
        anyhow::ensure!(
            refused == 0,
            "DeleteMessageBatch failed for {refused} messages"
        );
        let count = answer.successful().len();
        if count == 0 {
            continue;
        }
        let before = progress.deleted.fetch_add(count, Ordering::Relaxed);
        let now = Instant::now();
        if before == 0 {
            let _ = progress.first.set((now, count));
        }
        if before + count >= total {
            let _ = progress.last.set(now);
        }
    }
    Ok(())
}
