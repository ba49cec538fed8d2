//! The Amazon SQS queue backend (or any SQS-compatible server), through the AWS SDK.
//!
//! Owns [`SqsQueue`]: publishing with SendMessageBatch (`publish`), receiving with long
//! polls filled up by further short receives (here), received batches whose visibility is
//! extended while they are worked on and settled with batch calls (`batch`), opening the
//! client and the queue (`connect`) and error mapping (`error`). Delivery is at least
//! once; `Delivery::attempt` is SQS's receive count. No redrive policy is set: the workers
//! park events that keep failing in failed_events themselves.
//!
//! FIFO queues (names ending in `.fifo`) work too: one message group per CRM table, so a
//! table's events arrive in order, and de-duplication of the SDK's resends of a call.

mod batch;
mod connect;
mod error;
mod publish;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use futures::stream::{FuturesUnordered, StreamExt};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::{Delivery, Depth, Message, Queue, QueueError, QueueOptions, ReceivedBatch, SqsTarget};
pub use batch::lease_lost;
use batch::{SqsBatch, MAX_VISIBILITY_SECONDS};
use error::{broker, other};
// The limits and attribute names, public for the benchmark that measures the server alone.
pub use publish::{EVENT_ID, EVENT_TYPE, MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES, PARALLEL_CALLS};

/// SQS's longest long poll.
const MAX_WAIT_SECONDS: i32 = 20;
/// How long a receive keeps filling its batch with further receives once messages came.
const FILL_BUDGET: Duration = Duration::from_millis(500);
/// How old a depth reading `is_full` may answer from: one paid call a second at most.
const DEPTH_MAX_AGE: Duration = Duration::from_secs(1);

/// How to reach SQS, beyond the standard AWS chain (which fills in what is None here).
#[derive(Debug, Clone, Default)]
pub struct SqsSettings {
    /// The server to talk to instead of AWS's endpoint (`--sqs-endpoint`).
    pub endpoint: Option<String>,
    /// The region; None: from the queue URL, else AWS_REGION, the profile or the instance.
    pub region: Option<String>,
    /// A fixed key pair; None: the standard credential chain.
    pub credentials: Option<StaticCredentials>,
}

/// An access key pair given directly (tests against a local server, say).
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl StaticCredentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }
}

impl fmt::Debug for StaticCredentials {
    /// Never shows the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// What the queue and its batches share.
struct Shared {
    client: Client,
    url: String,
    fifo: bool,
    /// The lease as SQS's visibility timeout, in whole seconds.
    lease_seconds: i32,
}

pub struct SqsQueue {
    shared: Arc<Shared>,
    capacity: u64,
    /// The last depth reading and when it was taken, for `is_full`.
    depth_reading: tokio::sync::Mutex<Option<(Instant, u64)>>,
}

impl SqsQueue {
    /// Opens the queue `target` names: looks it up (a name), creating it with the lease as
    /// visibility timeout when missing, or checks that it exists (a URL). `options.sqs`
    /// says how to reach SQS beyond the standard AWS chain.
    pub async fn open(target: &SqsTarget, options: &QueueOptions) -> Result<Self, QueueError> {
        let lease_seconds = lease_seconds(options.lease);
        let client = connect::client(target, &options.sqs).await?;
        let url = connect::queue_url(&client, target, lease_seconds, options.creates).await?;
        tracing::debug!(queue = %target, %url, lease_s = lease_seconds, "SQS queue open");
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                url,
                fifo: target.is_fifo(),
                lease_seconds,
            }),
            capacity: options.capacity,
            depth_reading: tokio::sync::Mutex::new(None),
        })
    }

    /// The SDK client, for tools and tests that need a call the queue does not make.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// One ReceiveMessage call: up to `count` messages, waiting up to `wait_seconds`.
    async fn receive_once(
        &self,
        count: usize,
        wait_seconds: i32,
    ) -> Result<Vec<(Delivery, String)>, QueueError> {
        let answer = self
            .shared
            .client
            .receive_message()
            .queue_url(&self.shared.url)
            .max_number_of_messages(count.min(MAX_BATCH_ENTRIES) as i32)
            .wait_time_seconds(wait_seconds)
            .visibility_timeout(self.shared.lease_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names(EVENT_ID)
            .message_attribute_names(EVENT_TYPE)
            .send()
            .await
            .map_err(|e| broker("ReceiveMessage", e))?;
        let mut received = Vec::with_capacity(answer.messages().len());
        for message in answer.messages() {
            let Some(receipt) = message.receipt_handle() else {
                // Cannot be settled or extended: it comes back when its visibility ends.
                tracing::warn!(message_id = ?message.message_id(), "SQS returned a message without a receipt handle");
                continue;
            };
            let attempt = message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|count| count.parse::<u32>().ok())
                .unwrap_or(1)
                .max(1);
            let event_id = message
                .message_attributes()
                .and_then(|a| a.get(EVENT_ID))
                .and_then(|value| value.string_value())
                .and_then(|id| Uuid::parse_str(id).ok());
            let delivery = Delivery {
                event_id,
                body: message.body().unwrap_or_default().to_string(),
                attempt,
            };
            received.push((delivery, receipt.to_string()));
        }
        Ok(received)
    }

    /// After a first receive brought messages: more receives without waiting, up to
    /// [`PARALLEL_CALLS`] at a time, never asking for more than `room` in all, until one
    /// comes back empty or [`FILL_BUDGET`] is spent. A failure ends the filling but keeps
    /// what came: a received message is never dropped.
    async fn fill(&self, received: &mut Vec<(Delivery, String)>, room: usize) {
        let started = Instant::now();
        let (mut asked, mut more) = (0usize, true);
        let mut calls = FuturesUnordered::new();
        loop {
            while more
                && calls.len() < PARALLEL_CALLS
                && asked < room
                && started.elapsed() < FILL_BUDGET
            {
                let count = MAX_BATCH_ENTRIES.min(room - asked);
                asked += count;
                calls.push(async move { (count, self.receive_once(count, 0).await) });
            }
            let Some((count, answer)) = calls.next().await else {
                return;
            };
            asked -= count;
            match answer {
                Ok(messages) => {
                    more &= !messages.is_empty();
                    asked += messages.len();
                    received.extend(messages);
                }
                Err(error) => {
                    more = false;
                    tracing::debug!(%error, "filling an SQS batch failed; keeping what came");
                }
            }
        }
    }

    /// ApproximateNumberOfMessages + NotVisible + Delayed.
    async fn read_depth(&self) -> Result<u64, QueueError> {
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let answer = self
            .shared
            .client
            .get_queue_attributes()
            .queue_url(&self.shared.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| broker("GetQueueAttributes", e))?;
        let attributes = answer.attributes();
        let mut total = 0u64;
        for name in &names {
            let value = attributes.and_then(|a| a.get(name)).ok_or_else(|| {
                other(
                    "GetQueueAttributes",
                    format!("SQS did not return {}", name.as_str()),
                    true,
                )
            })?;
            let count = value.parse::<u64>().map_err(|_| {
                other(
                    "GetQueueAttributes",
                    format!("{} is not a count: {value:?}", name.as_str()),
                    true,
                )
            })?;
            total = total.saturating_add(count);
        }
        Ok(total)
    }
}

/// The lease as a visibility timeout: whole seconds, rounded up, 1 s to 12 h.
fn lease_seconds(lease: Duration) -> i32 {
    batch::visibility_seconds(lease).clamp(1, MAX_VISIBILITY_SECONDS)
}

/// A long-poll wait in whole seconds, rounded up, 1 to 20.
fn wait_seconds(wait: Duration) -> i32 {
    batch::visibility_seconds(wait).clamp(1, MAX_WAIT_SECONDS)
}

#[async_trait]
impl Queue for SqsQueue {
    fn backend(&self) -> &'static str {
        "sqs"
    }

    async fn publish_messages(&self, messages: &[Message]) -> Result<(), QueueError> {
        publish::publish(&self.shared, messages).await
    }

    fn refuses(&self, message: &Message) -> Option<String> {
        publish::refuses(message)
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Box<dyn ReceivedBatch>, QueueError> {
        let mut received = match max {
            0 => Vec::new(),
            _ => self.receive_once(max, wait_seconds(wait)).await?,
        };
        if !received.is_empty() && received.len() < max {
            let room = max - received.len();
            self.fill(&mut received, room).await;
        }
        let (deliveries, receipts) = received.into_iter().unzip();
        Ok(Box::new(SqsBatch::new(
            self.shared.clone(),
            deliveries,
            receipts,
        )))
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        Ok(Depth {
            events: self.read_depth().await?,
            approximate: true,
        })
    }

    async fn is_full(&self) -> Result<bool, QueueError> {
        if self.capacity == u64::MAX {
            return Ok(false);
        }
        // Held across the call: concurrent relays share one reading instead of each paying.
        let mut reading = self.depth_reading.lock().await;
        let events = match *reading {
            Some((taken, events)) if taken.elapsed() < DEPTH_MAX_AGE => events,
            _ => {
                let events = self.read_depth().await?;
                *reading = Some((Instant::now(), events));
                events
            }
        };
        Ok(events >= self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_and_waits_become_whole_seconds_within_sqs_limits() {
        assert_eq!(lease_seconds(Duration::from_millis(100)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(30)), 30);
        assert_eq!(lease_seconds(Duration::from_secs(100_000)), 43_200);
        assert_eq!(wait_seconds(Duration::ZERO), 1);
        assert_eq!(wait_seconds(Duration::from_millis(250)), 1);
        assert_eq!(wait_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(wait_seconds(Duration::from_secs(60)), 20);
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let settings = SqsSettings {
            credentials: Some(StaticCredentials::new("AKIDEXAMPLE", "s3cr3t")),
            ..Default::default()
        };
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
