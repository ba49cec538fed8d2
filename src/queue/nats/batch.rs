//! A batch received from JetStream: keeps its messages leased while the worker applies
//! them (in-progress acks every third of the lease), then acknowledges what is done and
//! negatively acknowledges, with the worker's delay, what is to be retried.
//!
//! A batch dropped unsettled (the worker failed on the database, or stopped) is given back
//! at once with a nak without delay, from a spawned task: another worker gets the events
//! right away instead of after the lease, as with the PostgreSQL queue's rollback, and the
//! worker's own backoff after a failure keeps that from spinning.

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::queue::{Delivery, QueueError, ReceivedBatch, Settlement};

/// Acks of one batch awaiting their confirmation at once.
const ACKS_IN_FLIGHT: usize = 256;

pub struct NatsBatch {
    client: Client,
    /// Each delivery's ack subject ($JS.ACK…), by index.
    replies: Vec<Subject>,
    deliveries: Vec<Delivery>,
    /// The keep-alive task, and the sender whose drop stops it.
    keep_alive: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    settled: bool,
}

impl NatsBatch {
    pub fn empty(client: Client) -> Self {
        Self {
            client,
            replies: Vec::new(),
            deliveries: Vec::new(),
            keep_alive: None,
            settled: true,
        }
    }

    /// A batch of received messages; keeps them leased every `period` until settled.
    pub fn new(
        client: Client,
        replies: Vec<Subject>,
        deliveries: Vec<Delivery>,
        period: Duration,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep_alive(client.clone(), replies.clone(), period, stopped));
        Self {
            client,
            replies,
            deliveries,
            keep_alive: Some((stop, task)),
            settled: false,
        }
    }
}

/// Sends `+WPI` (work in progress) for every message each `period`, which restarts the
/// server's ack wait, until `stopped` resolves (sent or dropped).
async fn keep_alive(
    client: Client,
    replies: Vec<Subject>,
    period: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(period) => {}
        }
        for reply in &replies {
            if let Err(error) = client
                .publish(reply.clone(), AckKind::Progress.into())
                .await
            {
                tracing::warn!(%error, "cannot extend the lease of a NATS batch");
                break;
            }
        }
        tracing::trace!(
            messages = replies.len(),
            "extended the lease of a NATS batch"
        );
    }
}

#[async_trait]
impl ReceivedBatch for NatsBatch {
    fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        self.settled = true;
        // Stopped and waited for: a progress ack sent after a delayed nak would restart
        // the server's ack wait and bring the retry back a lease later, not after its delay.
        if let Some((stop, task)) = self.keep_alive.take() {
            drop(stop);
            let _ = task.await;
        }
        if self.replies.is_empty() {
            return Ok(());
        }
        // Whatever the settlement leaves out goes back at once, as if dropped.
        let mut kinds: Vec<Option<AckKind>> = vec![None; self.replies.len()];
        for index in settlement.done {
            if let Some(kind) = kinds.get_mut(index) {
                *kind = Some(AckKind::Ack);
            }
        }
        for (index, delay, _) in settlement.retry {
            if let Some(kind) = kinds.get_mut(index) {
                *kind = Some(AckKind::Nak(Some(delay)));
            }
        }
        let total = self.replies.len();
        let replies = std::mem::take(&mut self.replies);
        let client = self.client.clone();
        // Acks with a reply ("double acks"): the server confirms each one, so a lost ack is
        // an error here rather than a silent redelivery a lease later. Pipelined, bounded.
        let results: Vec<Result<(), String>> = stream::iter(replies.into_iter().zip(kinds))
            .map(move |(reply, kind)| {
                let client = client.clone();
                let kind = kind.unwrap_or(AckKind::Nak(None));
                async move {
                    client
                        .request(reply, kind.into())
                        .await
                        .map(drop)
                        .map_err(|error| error.to_string())
                }
            })
            .buffer_unordered(ACKS_IN_FLIGHT)
            .collect()
            .await;
        let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(QueueError::Broker {
                backend: "nats",
                operation: "ack",
                message: format!(
                    "{} of {} acknowledgements were not confirmed (those messages come back \
                     after the lease): {first}",
                    failed.len(),
                    total
                ),
                retryable: true,
            }),
        }
    }
}

impl Drop for NatsBatch {
    fn drop(&mut self) {
        if self.settled || self.replies.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the lease runs out and the server redelivers
        };
        let client = self.client.clone();
        let replies = std::mem::take(&mut self.replies);
        runtime.spawn(async move {
            for reply in replies {
                if let Err(error) = client.publish(reply, AckKind::Nak(None).into()).await {
                    tracing::warn!(%error, "cannot give a dropped NATS batch back; it comes back after the lease");
                    return;
                }
            }
        });
    }
}
