//! Queue: carries events from the relay to the workers, at least once.
//!
//! Owns the [`Queue`] trait every backend implements and the backends themselves (one
//! folder or file each). Delivery is at least once and may duplicate; the workers make
//! the effect exactly once. Every backend is bounded, so a slow consumer slows the relay
//! down instead of filling memory.

pub mod postgres;

use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;

use crate::event::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// One message as received: the raw body (decoded by the worker, so that a malformed
/// message fails alone) and how many times it was attempted before.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event id as the transport knows it, when it does.
    pub event_id: Option<Uuid>,
    pub body: String,
    /// 1 on the first delivery; failed attempts so far plus one.
    pub attempt: u32,
}

/// What the worker decided for each delivery of a batch, by index.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Done with: applied, skipped as duplicate, or parked in failed_events.
    pub done: Vec<usize>,
    /// To be delivered again after a delay, with the error that made it fail.
    pub retry: Vec<(usize, Duration, String)>,
}

/// A batch of deliveries leased to one worker until it is settled. Dropping it unsettled
/// gives the deliveries back to the queue (after the backend's lease runs out).
#[async_trait]
pub trait ReceivedBatch: Send {
    fn deliveries(&self) -> &[Delivery];
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError>;
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Appends events; on error none or some may have been published (at least once).
    async fn publish(&self, events: &[Envelope]) -> Result<(), QueueError>;
    /// Leases up to `max` deliveries; an empty batch means nothing is ready.
    async fn receive(&self, max: usize) -> Result<Box<dyn ReceivedBatch>, QueueError>;
    /// A counter of wake-ups: read it before `receive`, pass it to `wait_for_messages`.
    fn epoch(&self) -> u64;
    /// Waits until something may have arrived since `seen`, or `timeout` passes.
    async fn wait_for_messages(&self, seen: u64, timeout: Duration);
    /// Events waiting or in flight (exact; for status and health).
    async fn depth(&self) -> Result<u64, QueueError>;
    /// Whether the queue is at capacity and publishers should hold back.
    async fn is_full(&self) -> Result<bool, QueueError>;
}
