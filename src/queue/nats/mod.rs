//! The NATS JetStream queue backend (`CRM_ANALYTICS_QUEUE=nats://HOST:PORT[/STREAM]`).
//!
//! Owns the connection, publishing (JetStream publishes with the event id as `Nats-Msg-Id`,
//! so the server drops a re-published event within the duplicate window), receiving (one
//! pull request per call that returns as soon as messages are there) and the depth. The
//! stream and consumer setup is in `setup`, a received batch's lease and acks in `batch`,
//! the URL and names in `settings`.

mod batch;
mod settings;
mod setup;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::VecDeque;
use std::fmt::Display;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{Delivery, Depth, Message, Queue, QueueError, QueueOptions, ReceivedBatch};
use batch::NatsBatch;
pub use settings::{
    check_name, check_subject, parse_consumer, parse_subject, Credentials, NatsOptions, NatsSpec,
    DEFAULT_CONSUMER, DEFAULT_STREAM,
};
pub use setup::DUPLICATE_WINDOW;

/// The header that carries the event type (`<table>.<operation>`), for tools that route or
/// inspect messages without decoding them.
pub const EVENT_TYPE_HEADER: &str = "event-type";
/// Longest wait for the server to answer when connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a JetStream API answer or a publish acknowledgement.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes of one call sent ahead of their acknowledgements.
const PUBLISHES_IN_FLIGHT: usize = 1024;
/// How old a depth reading `is_full` answers from may be.
const DEPTH_MAX_AGE: Duration = Duration::from_millis(250);
/// A pull request shorter than this is not worth sending: `receive` returns empty instead.
const MIN_EXPIRES: Duration = Duration::from_millis(5);

pub struct NatsQueue {
    shown: String,
    client: Client,
    context: jetstream::Context,
    stream: jetstream::stream::Stream,
    consumer: PullConsumer,
    subject: String,
    /// How often a received batch is kept alive: a third of the lease.
    keep_alive: Duration,
    capacity: u64,
    /// The last depth reading and when it was taken, for `is_full`.
    depth_reading: tokio::sync::Mutex<Option<(Instant, u64)>>,
}

impl NatsQueue {
    /// Connects, and gets or creates the stream (`spec.stream`) and the durable consumer
    /// (`options.nats`), with the lease as the consumer's ack wait.
    pub async fn open(spec: &NatsSpec, options: &QueueOptions) -> Result<Self, QueueError> {
        let consumer_name = &options.nats.consumer;
        check_name(consumer_name, "consumer", "CRM_ANALYTICS_NATS_CONSUMER")
            .map_err(QueueError::Setting)?;
        let subject = options.nats.subject_for(&spec.stream);
        check_subject(&subject).map_err(QueueError::Setting)?;
        if options.lease < Duration::from_millis(30) {
            return Err(QueueError::Setting(format!(
                "CRM_ANALYTICS_QUEUE_LEASE is {:?}; the NATS queue needs at least 30ms (it is \
                 the consumer's ack wait)",
                options.lease
            )));
        }
        let client = connect(spec).await?;
        let context = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        if !options.creates {
            setup::require_existing(&context, &spec.stream, consumer_name).await?;
        }
        let stream = setup::stream(&context, &spec.stream, &subject).await?;
        let consumer = setup::consumer(
            &stream,
            consumer_name,
            &subject,
            options.lease,
            options.consumes,
        )
        .await?;
        tracing::info!(queue = %spec, consumer = %consumer_name, %subject, lease = ?options.lease, "NATS JetStream queue open");
        Ok(Self {
            shown: spec.to_string(),
            client,
            context,
            stream,
            consumer,
            subject,
            keep_alive: options.lease / 3,
            capacity: options.capacity,
            depth_reading: tokio::sync::Mutex::new(None),
        })
    }

    /// The subject this queue publishes on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Messages in the stream: under work-queue retention a message leaves the stream when
    /// it is acknowledged, so this counts waiting, leased and delayed events, exactly.
    async fn read_depth(&self) -> Result<u64, QueueError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|error| broker("depth", &error, true))?;
        Ok(info.state.messages)
    }
}

impl std::fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NatsQueue({})", self.shown)
    }
}

/// Connects once with a bounded wait; reconnects later on its own (publishes and receives
/// fail with retryable errors meanwhile).
async fn connect(spec: &NatsSpec) -> Result<Client, QueueError> {
    let mut options = ConnectOptions::new()
        .name("crm-analytics")
        .connection_timeout(CONNECT_TIMEOUT)
        .event_callback(|event| async move {
            match event {
                // async-nats logs connecting itself; a lost connection is worth a warning.
                Event::Connected => tracing::debug!("connected to NATS"),
                Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                // The client closing its connection (the process shutting down).
                Event::Closed => tracing::debug!("NATS connection closed"),
                other => tracing::warn!(event = %other, "NATS connection"),
            }
        });
    match &spec.credentials {
        Some(Credentials::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        Some(Credentials::Token(token)) => options = options.token(token.clone()),
        None => {}
    }
    let connecting = options.connect(spec.server.as_str());
    let unreachable = |why: String, retryable: bool| QueueError::Broker {
        backend: "nats",
        operation: "connect",
        message: format!("cannot reach NATS at {spec} (CRM_ANALYTICS_QUEUE): {why}"),
        retryable,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), connecting).await {
        Err(_) => Err(unreachable(
            format!("no answer within {CONNECT_TIMEOUT:?}; is nats-server running there?"),
            true,
        )),
        Ok(Err(error)) => match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Err(unreachable(
                    format!("the server refused the credentials in the URL ({error})"),
                    false,
                ))
            }
            ConnectErrorKind::ServerParse | ConnectErrorKind::Dns => {
                Err(unreachable(error.to_string(), false))
            }
            _ => Err(unreachable(
                format!("{error}; is nats-server running there?"),
                true,
            )),
        },
        Ok(Ok(client)) => Ok(client),
    }
}

fn broker(operation: &'static str, error: &dyn Display, retryable: bool) -> QueueError {
    QueueError::Broker {
        backend: "nats",
        operation,
        message: error.to_string(),
        retryable,
    }
}

fn publish_error(stream: &str, error: jetstream::context::PublishError) -> QueueError {
    match error.kind() {
        PublishErrorKind::StreamNotFound => QueueError::Broker {
            backend: "nats",
            operation: "publish",
            message: format!(
                "no JetStream stream takes this subject any more (was {stream} deleted?); \
                 restart to create it again: {error}"
            ),
            retryable: false,
        },
        _ => broker("publish", &error, true),
    }
}

impl NatsQueue {
    /// Publishes `messages` with the given message ids; returns once the stream
    /// acknowledged every one.
    async fn send(
        &self,
        messages: &[Message],
        message_id: impl Fn(&Message) -> String,
    ) -> Result<(), QueueError> {
        let stream = &self.stream.cached_info().config.name;
        let max_payload = self.client.server_info().max_payload;
        // Every publish goes out before the first acknowledgement is awaited (one round
        // trip per call, not per event), at most PUBLISHES_IN_FLIGHT ahead.
        let mut acks: VecDeque<PublishAckFuture> =
            VecDeque::with_capacity(messages.len().min(PUBLISHES_IN_FLIGHT));
        let mut duplicates = 0usize;
        for message in messages {
            if acks.len() >= PUBLISHES_IN_FLIGHT {
                if let Some(ack) = acks.pop_front() {
                    duplicates +=
                        usize::from(ack.await.map_err(|e| publish_error(stream, e))?.duplicate);
                }
            }
            if let Some(refusal) = too_large(message, max_payload) {
                return Err(QueueError::Broker {
                    backend: "nats",
                    operation: "publish",
                    message: refusal,
                    retryable: false,
                });
            }
            let publish = PublishMessage::build()
                .payload(message.body.clone().into())
                .message_id(message_id(message))
                .header(EVENT_TYPE_HEADER, message.event_type.as_str());
            let ack = self
                .context
                .send_publish(self.subject.clone(), publish)
                .await
                .map_err(|e| publish_error(stream, e))?;
            acks.push_back(ack);
        }
        for ack in acks {
            duplicates += usize::from(ack.await.map_err(|e| publish_error(stream, e))?.duplicate);
        }
        if duplicates > 0 {
            tracing::debug!(duplicates, "NATS dropped re-published events");
        }
        Ok(())
    }
}

/// Why a server with this `max_payload` can never take `message`, or None.
fn too_large(message: &Message, max_payload: usize) -> Option<String> {
    (max_payload > 0 && message.body.len() > max_payload).then(|| {
        format!(
            "event {} is {} bytes, over the server's max_payload of {max_payload}; raise \
             max_payload in the nats-server configuration",
            message.event_id,
            message.body.len()
        )
    })
}

#[async_trait]
impl Queue for NatsQueue {
    fn backend(&self) -> &'static str {
        "nats"
    }

    fn refuses(&self, message: &Message) -> Option<String> {
        too_large(message, self.client.server_info().max_payload)
    }

    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        // The event id is the message id: a relay that publishes a batch again (it died
        // before deleting its outbox rows) is de-duplicated by the stream.
        self.send(messages, |message| message.event_id.to_string())
            .await
    }

    async fn republish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        // Sent again on purpose: an id of its own, or the stream's duplicate window would
        // drop an event parked and retried within it.
        let resend = Uuid::new_v4().simple();
        self.send(messages, |message| format!("{}.{resend}", message.event_id))
            .await
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        let (sender, answer) = oneshot::channel();
        let consumer = self.consumer.clone();
        // The pull runs in a task of its own: if the caller stops waiting (shutdown), the
        // messages already on their way are given back at once instead of a lease later.
        tokio::spawn(async move {
            let fetched = fetch(&consumer, max.max(1), wait).await;
            if let Err(Ok(messages)) = sender.send(fetched) {
                for message in messages {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            }
        });
        let messages = answer
            .await
            .map_err(|_| broker("receive", &"the pull task stopped", true))??;
        if messages.is_empty() {
            return Ok(Box::new(NatsBatch::empty(self.client.clone())));
        }
        let mut replies = Vec::with_capacity(messages.len());
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            let Some(reply) = message.reply.clone() else {
                tracing::warn!("a NATS message without an ack subject; skipped");
                continue;
            };
            // The server counts deliveries, the first being 1.
            let attempt = message
                .info()
                .map(|info| info.delivered.clamp(1, i64::from(u32::MAX)) as u32)
                .unwrap_or(1);
            let event_id = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
                // A message sent again on purpose carries `<event id>.<nonce>`.
                .and_then(|id| {
                    Uuid::parse_str(id.as_str().split('.').next().unwrap_or_default()).ok()
                });
            // A body that is not UTF-8 is kept (lossily) for the worker to fail and park.
            let body = String::from_utf8_lossy(&message.payload).into_owned();
            replies.push(reply);
            deliveries.push(Delivery {
                event_id,
                body,
                attempt,
            });
        }
        Ok(Box::new(NatsBatch::new(
            self.client.clone(),
            replies,
            deliveries,
            self.keep_alive,
        )))
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        Ok(Depth {
            events: self.read_depth().await?,
            approximate: false,
        })
    }

    async fn is_full(&self) -> Result<bool, QueueError> {
        if self.capacity == u64::MAX {
            return Ok(false);
        }
        // One reading at a time; callers within DEPTH_MAX_AGE share it.
        let mut reading = self.depth_reading.lock().await;
        let events = match *reading {
            Some((at, events)) if at.elapsed() < DEPTH_MAX_AGE => events,
            _ => {
                let events = self.read_depth().await?;
                *reading = Some((Instant::now(), events));
                events
            }
        };
        Ok(events >= self.capacity)
    }
}

/// One pull request for up to `max` messages that the server ends as soon as it has sent
/// what is there (no_wait with an expiry: it waits up to `wait` for the first message, then
/// returns at once rather than waiting to fill the batch). Asks again, for what is left of
/// `wait`, when the server ended a request early with nothing.
async fn fetch(
    consumer: &PullConsumer,
    max: usize,
    wait: Duration,
) -> Result<Vec<jetstream::Message>, QueueError> {
    let deadline = Instant::now() + wait;
    let mut messages = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut request = consumer.fetch().max_messages(max);
        if remaining >= MIN_EXPIRES {
            request = request.expires(remaining);
        }
        let started = Instant::now();
        let mut batch = request
            .messages()
            .await
            .map_err(|error| broker("receive", &error, true))?;
        while let Some(item) = batch.next().await {
            match item {
                Ok(message) => messages.push(message),
                Err(error) if messages.is_empty() => return Err(broker("receive", &error, true)),
                Err(error) => {
                    tracing::debug!(%error, "a NATS pull request ended early");
                    break;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !messages.is_empty() || left < MIN_EXPIRES {
            return Ok(messages);
        }
        if started.elapsed() < MIN_EXPIRES {
            // Ended at once with nothing (other requests were owed the pending messages):
            // do not spin while they take them.
            tokio::time::sleep(MIN_EXPIRES).await;
        }
    }
}
