//! Publishing to SQS: messages cut into SendMessageBatch calls of at most 10 entries and
//! 256 KiB, the calls sent in parallel (bounded), entries that failed retried a few times.

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::{StreamExt, TryStreamExt};
use std::borrow::Cow;
use std::ops::Range;
use std::time::Duration;
use uuid::Uuid;

use super::error::{broker, other, retryable_code};
use super::Shared;
use crate::queue::{Message, QueueError};

/// SQS's limit for one message, and for all the messages of one batch call, counting the
/// body and each attribute's name, type and value.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// SQS's limit of entries per batch call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Batch calls in flight at once per publish (and receive calls per batch being filled).
pub const PARALLEL_CALLS: usize = 8;
/// Attempts for entries that SQS failed inside an otherwise successful batch call.
const ENTRY_ATTEMPTS: u32 = 3;

const STRING: &str = "String";
pub const EVENT_ID: &str = "event_id";
pub const EVENT_TYPE: &str = "event_type";

/// A message ready to send: its body as SQS accepts it and the size SQS counts.
pub(super) struct Prepared<'a> {
    pub(super) message: &'a Message,
    pub(super) body: Cow<'a, str>,
    pub(super) size: usize,
}

/// Checks sizes and makes bodies acceptable; a message over SQS's limit fails the whole
/// publish before anything is sent (it can never be published, so it is not retryable).
pub(super) fn prepare(messages: &[Message]) -> Result<Vec<Prepared<'_>>, QueueError> {
    messages
        .iter()
        .map(|message| {
            let body = sqs_safe_body(&message.body);
            let size = sqs_size(message, &body);
            if let Some(refusal) = refusal(message, size) {
                return Err(other("SendMessageBatch", refusal, false));
            }
            Ok(Prepared {
                message,
                body,
                size,
            })
        })
        .collect()
}

/// The size SQS counts for `message` sent with `body`.
fn sqs_size(message: &Message, body: &str) -> usize {
    body.len()
        + attribute_size(EVENT_ID, &message.event_id.to_string())
        + attribute_size(EVENT_TYPE, &message.event_type)
}

/// Why SQS can never take `message`, or None (see [`crate::queue::Queue::refuses`]).
pub(super) fn refuses(message: &Message) -> Option<String> {
    refusal(message, sqs_size(message, &sqs_safe_body(&message.body)))
}

fn refusal(message: &Message, size: usize) -> Option<String> {
    (size > MAX_MESSAGE_BYTES).then(|| {
        format!(
            "event {} ({}) is {size} bytes as an SQS message; SQS takes at most \
             {MAX_MESSAGE_BYTES} bytes per message, so this event cannot go through the SQS \
             queue (use the postgres queue, or keep the row's large columns out of capture \
             with --capture-columns metrics)",
            message.event_id, message.event_type
        )
    })
}

/// SQS counts an attribute as its name, its type and its value; an empty value is not sent.
fn attribute_size(name: &str, value: &str) -> usize {
    match value.is_empty() {
        true => 0,
        false => name.len() + STRING.len() + value.len(),
    }
}

/// SQS refuses the characters U+FFFE and U+FFFF in a body; JSON (every body is) carries
/// them unchanged when written as `\u` escapes, which is what this does. Every other
/// character SQS refuses is a control character, which JSON always escapes already.
pub(super) fn sqs_safe_body(body: &str) -> Cow<'_, str> {
    if !body.contains(['\u{FFFE}', '\u{FFFF}']) {
        return Cow::Borrowed(body);
    }
    Cow::Owned(
        body.replace('\u{FFFE}', "\\ufffe")
            .replace('\u{FFFF}', "\\uffff"),
    )
}

/// Consecutive runs of at most 10 messages and [`MAX_MESSAGE_BYTES`] in total.
pub(super) fn split(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, &size) in sizes.iter().enumerate() {
        if index > start && (index - start == MAX_BATCH_ENTRIES || bytes + size > MAX_MESSAGE_BYTES)
        {
            batches.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        batches.push(start..sizes.len());
    }
    batches
}

/// Publishes every message, at most [`PARALLEL_CALLS`] batch calls at a time (one for a
/// FIFO queue, whose order is the order of the calls); the first
/// failure ends the publish (some messages may be on the queue: at least once).
pub(super) async fn publish(shared: &Shared, messages: &[Message]) -> Result<(), QueueError> {
    let prepared = prepare(messages)?;
    let sizes: Vec<usize> = prepared.iter().map(|p| p.size).collect();
    // FIFO de-duplication id: the event id plus one id for this publish, so that SQS drops
    // the SDK's own resends of a call but never a later, deliberate publish of the same
    // event (an operator's `failed retry`), which it would otherwise drop for 5 minutes.
    let publish_id = Uuid::new_v4();
    // A FIFO queue keeps the order of arrival: its calls go one after the other.
    let parallel = if shared.fifo { 1 } else { PARALLEL_CALLS };
    futures::stream::iter(split(&sizes))
        .map(|range| send(shared, &prepared[range], publish_id))
        .buffer_unordered(parallel)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// One SendMessageBatch call, then again for the entries SQS failed (bounded).
async fn send(shared: &Shared, batch: &[Prepared<'_>], publish_id: Uuid) -> Result<(), QueueError> {
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    for attempt in 1..=ENTRY_ATTEMPTS {
        let entries = pending
            .iter()
            .map(|&i| entry(i, &batch[i], shared.fifo, publish_id))
            .collect::<Result<Vec<_>, _>>()?;
        let sent = shared
            .client
            .send_message_batch()
            .queue_url(&shared.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| broker("SendMessageBatch", e))?;
        let failed = sent.failed();
        if failed.is_empty() {
            return Ok(());
        }
        let retryable = failed
            .iter()
            .all(|f| !f.sender_fault() || retryable_code(f.code()));
        if !retryable || attempt == ENTRY_ATTEMPTS {
            let first = &failed[0];
            return Err(other(
                "SendMessageBatch",
                format!(
                    "{} of {} messages were refused (after {attempt} attempts), first: {}: {}",
                    failed.len(),
                    pending.len(),
                    first.code(),
                    first.message().unwrap_or_default()
                ),
                retryable,
            ));
        }
        tracing::debug!(
            failed = failed.len(),
            attempt,
            "SQS refused some messages of a batch; sending them again"
        );
        pending = failed
            .iter()
            .filter_map(|f| f.id().parse::<usize>().ok())
            .filter(|&i| i < batch.len())
            .collect();
        tokio::time::sleep(Duration::from_millis(100) * attempt).await;
    }
    Ok(())
}

fn entry(
    index: usize,
    prepared: &Prepared<'_>,
    fifo: bool,
    publish_id: Uuid,
) -> Result<SendMessageBatchRequestEntry, QueueError> {
    let message = prepared.message;
    let mut entry = SendMessageBatchRequestEntry::builder()
        .id(index.to_string())
        .message_body(prepared.body.as_ref())
        .message_attributes(EVENT_ID, string_attribute(&message.event_id.to_string())?);
    if !message.event_type.is_empty() {
        entry = entry.message_attributes(EVENT_TYPE, string_attribute(&message.event_type)?);
    }
    if fifo {
        // One group per CRM table: a table's events arrive in order, tables in parallel.
        let table = message.event_type.split('.').next().unwrap_or_default();
        let group = if table.is_empty() { "events" } else { table };
        entry = entry
            .message_group_id(group)
            .message_deduplication_id(format!(
                "{}-{}",
                message.event_id.simple(),
                publish_id.simple()
            ));
    }
    entry
        .build()
        .map_err(|e| other("SendMessageBatch", e.to_string(), false))
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, QueueError> {
    MessageAttributeValue::builder()
        .data_type(STRING)
        .string_value(value)
        .build()
        .map_err(|e| other("SendMessageBatch", e.to_string(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_ten_messages_and_256_kib() {
        assert_eq!(split(&[]), Vec::<Range<usize>>::new());
        assert_eq!(split(&[1; 25]), vec![0..10, 10..20, 20..25]);
        let big = MAX_MESSAGE_BYTES / 2;
        assert_eq!(split(&[big, big, 1, big]), vec![0..2, 2..4]);
        assert_eq!(
            split(&[MAX_MESSAGE_BYTES, 1, MAX_MESSAGE_BYTES]),
            vec![0..1, 1..2, 2..3]
        );
    }

    fn message(body: String) -> Message {
        Message {
            event_id: Uuid::new_v4(),
            event_type: "leads.insert".into(),
            body,
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_sending_and_not_retryable() {
        let attributes = attribute_size(EVENT_ID, &Uuid::nil().to_string())
            + attribute_size(EVENT_TYPE, "leads.insert");
        let fits = [message("x".repeat(MAX_MESSAGE_BYTES - attributes))];
        assert_eq!(prepare(&fits).expect("fits")[0].size, MAX_MESSAGE_BYTES);
        let over = [message("x".repeat(MAX_MESSAGE_BYTES - attributes + 1))];
        let Err(error) = prepare(&over) else {
            panic!("a message over the limit was accepted")
        };
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("262144"), "{error}");
    }

    #[test]
    fn characters_sqs_refuses_are_escaped_as_json() {
        let body = serde_json::json!({"note": "a\u{FFFF}b\u{FFFE}"}).to_string();
        let safe = sqs_safe_body(&body);
        assert!(!safe.contains(['\u{FFFE}', '\u{FFFF}']));
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still JSON");
        assert_eq!(back["note"], "a\u{FFFF}b\u{FFFE}");
        assert!(matches!(sqs_safe_body("{\"a\":1}"), Cow::Borrowed(_)));
    }
}
