//! Gets or creates the JetStream stream and the durable pull consumer the queue needs, and
//! reconciles one that already exists: what can safely change is updated (the duplicate
//! window, the ack wait, the delivery limits), what cannot (retention, storage, subjects,
//! ack policy, filter) is an error that says what differs and how to fix it.

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use std::time::Duration;

use super::broker;
use crate::queue::QueueError;

/// How long the server remembers published message ids (`Nats-Msg-Id`) to drop a second
/// publish of the same event. A relay re-publishes a batch when its publish or commit
/// failed (at most CRM_ANALYTICS_RELAY_TIMEOUT, 30 s by default, plus a backoff of a few
/// seconds); two minutes covers that with room, while keeping the server's id index small
/// (ids of two minutes of traffic). Duplicates past the window are still harmless: the
/// workers' ledger drops them.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Gets the stream, creating it when missing: work-queue retention (a message leaves the
/// stream once acknowledged, so its message count is the queue's depth), file storage (a
/// server restart keeps events), and discard-new so that if an operator sets limits, a
/// full stream refuses publishes instead of silently dropping the oldest events.
pub async fn stream(
    context: &Context,
    name: &str,
    subject: &str,
) -> Result<stream::Stream, QueueError> {
    let wanted = stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        duplicate_window: DUPLICATE_WINDOW,
        description: Some("crm-analytics events from the relay to the workers".into()),
        ..Default::default()
    };
    let found = match context.get_or_create_stream(wanted.clone()).await {
        Ok(found) => found,
        // Another process may have created it between our look and our create.
        Err(first) => context
            .get_stream(name)
            .await
            .map_err(|_| stream_error(name, subject, &first))?,
    };
    let have = found.cached_info().config.clone();
    let mut problems = Vec::new();
    if have.retention != RetentionPolicy::WorkQueue {
        problems.push(format!(
            "its retention is {:?}, the queue needs WorkQueue (a message leaves once acknowledged)",
            have.retention
        ));
    }
    if have.storage != StorageType::File {
        problems.push(format!(
            "its storage is {:?}, the queue needs File (events must survive a server restart)",
            have.storage
        ));
    }
    if !have.subjects.iter().any(|s| s == subject) {
        problems.push(format!(
            "its subjects are {:?}, not {subject:?} (CRM_ANALYTICS_NATS_SUBJECT)",
            have.subjects
        ));
    }
    let limited = have.max_age > Duration::ZERO
        || have.max_messages > 0
        || have.max_bytes > 0
        || have.max_messages_per_subject > 0;
    if limited && have.discard == DiscardPolicy::Old {
        // A full stream would drop the oldest events after the relay removed them from the
        // outbox: lost without a trace. With discard-new the publish fails and they wait.
        problems.push(format!(
            "it has limits (max age {:?}, max messages {}, max bytes {}, max messages per \
             subject {}) with discard policy Old, so a full stream silently drops the oldest \
             events; the queue needs no limits, or discard policy New (a full stream refuses \
             publishes and events wait in the outbox)",
            have.max_age, have.max_messages, have.max_bytes, have.max_messages_per_subject
        ));
    }
    if !problems.is_empty() {
        return Err(QueueError::Setting(format!(
            "the NATS stream {name} exists with other settings: {}; name another stream in \
             CRM_ANALYTICS_QUEUE (nats://HOST:PORT/STREAM), or delete this one (`nats stream rm \
             {name}`) if nothing else uses it",
            problems.join("; ")
        )));
    }
    if have.duplicate_window < DUPLICATE_WINDOW {
        // Safe to change in place: only widens de-duplication.
        let mut config = have.clone();
        config.duplicate_window = DUPLICATE_WINDOW;
        context
            .update_stream(&config)
            .await
            .map_err(|error| broker("stream update", &error, true))?;
        tracing::info!(stream = name, from = ?have.duplicate_window, to = ?DUPLICATE_WINDOW, "widened the NATS stream's duplicate window");
    }
    Ok(found)
}

/// Fails unless the stream and the consumer exist (for a process that must not create
/// them): a mistyped name is an error, not a new empty queue.
pub async fn require_existing(
    context: &Context,
    stream: &str,
    consumer: &str,
) -> Result<(), QueueError> {
    let missing = |what: String| {
        QueueError::Setting(format!(
            "{what} does not exist on this NATS server; relays and workers create it when they \
             start. Check the stream in CRM_ANALYTICS_QUEUE (nats://HOST:PORT/STREAM) and \
             CRM_ANALYTICS_NATS_CONSUMER"
        ))
    };
    let found = context
        .get_stream(stream)
        .await
        .map_err(|_| missing(format!("the stream {stream}")))?;
    found
        .consumer_info(consumer)
        .await
        .map_err(|_| missing(format!("the consumer {consumer} of stream {stream}")))?;
    Ok(())
}

fn stream_error(name: &str, subject: &str, error: &CreateStreamError) -> QueueError {
    let text = error.to_string();
    if text.contains("overlap") {
        return QueueError::Setting(format!(
            "cannot create the NATS stream {name}: another stream already takes subject \
             {subject:?}; set CRM_ANALYTICS_NATS_SUBJECT to a subject of this stream's own \
             ({text})"
        ));
    }
    if matches!(error.kind(), CreateStreamErrorKind::JetStreamUnavailable)
        || text.contains("no responders")
    {
        return QueueError::Broker {
            backend: "nats",
            operation: "stream create",
            message: format!(
                "the NATS server answers but JetStream is not enabled on it (start nats-server \
                 with -js): {text}"
            ),
            retryable: true,
        };
    }
    broker("stream create", error, true)
}

/// Gets the durable pull consumer, creating it when missing, with explicit acks, the lease
/// as ack wait and no server-side delivery limit: the workers count attempts and park an
/// event after CRM_ANALYTICS_MAX_ATTEMPTS themselves, whereas a message past the server's
/// max_deliver would silently stop being delivered and stay in the stream for ever. An
/// existing consumer's ack wait and limits are updated only when `consumes` (the opener
/// runs workers).
pub async fn consumer(
    stream: &stream::Stream,
    name: &str,
    subject: &str,
    lease: Duration,
    consumes: bool,
) -> Result<PullConsumer, QueueError> {
    let wanted = pull::Config {
        durable_name: Some(name.to_string()),
        name: Some(name.to_string()),
        description: Some("crm-analytics workers".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: lease,
        max_deliver: -1,
        filter_subject: subject.to_string(),
        // In flight is bounded by workers × batch size on our side, and delayed retries by
        // the stream; a server cap (1000 by default) would stall healthy events behind
        // retries waiting out their delay, and hold back workers with large batches.
        max_ack_pending: -1,
        ..Default::default()
    };
    let found: PullConsumer = match stream.get_or_create_consumer(name, wanted.clone()).await {
        Ok(found) => found,
        Err(first) => stream
            .get_consumer(name)
            .await
            .map_err(|_| consumer_error(name, &first))?,
    };
    let have = &found.cached_info().config;
    let mut problems = Vec::new();
    if have.ack_policy != AckPolicy::Explicit {
        problems.push(format!(
            "its ack policy is {:?}, the queue needs Explicit",
            have.ack_policy
        ));
    }
    if have.filter_subject != subject {
        problems.push(format!(
            "it filters {:?}, not {subject:?} (CRM_ANALYTICS_NATS_SUBJECT)",
            have.filter_subject
        ));
    }
    if have.deliver_subject.is_some() {
        problems.push("it is a push consumer, the queue needs a pull consumer".to_string());
    }
    if !problems.is_empty() {
        return Err(QueueError::Setting(format!(
            "the NATS consumer {name} on stream {} exists with other settings: {}; set \
             CRM_ANALYTICS_NATS_CONSUMER to another name, or delete this one (`nats consumer rm \
             {} {name}`) if nothing else uses it",
            stream.cached_info().config.name,
            problems.join("; "),
            stream.cached_info().config.name,
        )));
    }
    let outdated = have.ack_wait != lease || have.max_deliver > 0 || have.max_ack_pending > 0;
    if !outdated || !consumes {
        // A process that only publishes or reads the depth leaves the consumer to the
        // workers: its own lease (a `status` run with other settings) must not change theirs.
        return Ok(found);
    }
    // Safe to change in place. Processes opened with different leases would rewrite it in
    // turn (the last one wins): every worker process should have the same
    // CRM_ANALYTICS_QUEUE_LEASE.
    tracing::info!(consumer = name, ack_wait = ?have.ack_wait, max_deliver = have.max_deliver,
        max_ack_pending = have.max_ack_pending, lease = ?lease,
        "updating the NATS consumer: ack wait = the lease, no delivery or ack-pending limit");
    let mut config = pull::Config {
        ack_wait: lease,
        max_deliver: -1,
        max_ack_pending: -1,
        ..wanted
    };
    config.description = have.description.clone().or(config.description);
    stream
        .create_consumer(config)
        .await
        .map_err(|error| consumer_error(name, &error))
}

fn consumer_error(name: &str, error: &stream::ConsumerError) -> QueueError {
    QueueError::Broker {
        backend: "nats",
        operation: "consumer create",
        message: format!("the NATS consumer {name} (CRM_ANALYTICS_NATS_CONSUMER): {error}"),
        retryable: true,
    }
}
