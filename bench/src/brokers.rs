//! The queue backends a benchmark runs through, and a fresh stream (NATS) or queue (SQS)
//! of its own for every run, removed afterwards: no run ever drains what another left.
//!
//! NATS is the server of CRM_ANALYTICS_TEST_NATS, or nats://127.0.0.1:4222 when that
//! answers; SQS is the SQS-compatible server of CRM_ANALYTICS_TEST_AWS_ENDPOINT (the same
//! variables the tests read). A backend that is not there is reported as skipped.

use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

use crm_analytics::queue::nats::{NatsOptions, NatsSpec};
use crm_analytics::queue::sqs::{SqsQueue, SqsSettings, StaticCredentials};
use crm_analytics::queue::{Queue, QueueOptions, QueueSpec, SqsTarget};

/// The NATS server tried when CRM_ANALYTICS_TEST_NATS is not set, and its address.
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_NATS_ADDRESS: &str = "127.0.0.1:4222";
/// Credentials and region for the SQS-compatible server, which accepts any.
const AWS_KEY: &str = "test";
const AWS_REGION: &str = "us-east-1";

/// A queue backend and where its server is.
#[derive(Debug, Clone)]
pub enum Broker {
    Postgres,
    Nats { url: String },
    Sqs { endpoint: String },
}

impl Broker {
    pub fn name(&self) -> &'static str {
        match self {
            Broker::Postgres => "postgres",
            Broker::Nats { .. } => "nats",
            Broker::Sqs { .. } => "sqs",
        }
    }

    /// Longest a step moving `events` through this backend may take before the benchmark
    /// takes it to hang: a local SQS-compatible server may carry only tens of events a
    /// second on a busy machine.
    pub fn timeout(&self, events: i64) -> Duration {
        let slowest = match self {
            Broker::Sqs { .. } => 20,
            _ => 500,
        };
        Duration::from_secs((events.max(0) as u64 / slowest).max(120))
    }

    /// The three backends, each either ready or skipped with the reason.
    pub async fn all() -> Vec<Result<Broker, (&'static str, String)>> {
        vec![Ok(Broker::Postgres), nats().await, sqs()]
    }

    /// A stream or queue no one else uses (created when first opened, by whoever opens it).
    pub fn fresh(&self) -> anyhow::Result<FreshQueue> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (spec, options, mut env) = match self {
            Broker::Postgres => (QueueSpec::Postgres, QueueOptions::default(), Vec::new()),
            Broker::Nats { url } => {
                let spec = NatsSpec::new(url, &format!("BENCH_{id}"))
                    .map_err(|e| anyhow::anyhow!("the NATS server {url}: {e}"))?;
                let consumer = format!("bench-{id}");
                let options = QueueOptions {
                    nats: NatsOptions {
                        consumer: consumer.clone(),
                        subject: None,
                    },
                    ..QueueOptions::default()
                };
                let env = vec![("CRM_ANALYTICS_NATS_CONSUMER", consumer)];
                (QueueSpec::Nats(spec), options, env)
            }
            Broker::Sqs { endpoint } => {
                let target = SqsTarget::Name(format!("crm-analytics-bench-{id}"));
                let options = QueueOptions {
                    sqs: SqsSettings {
                        endpoint: Some(endpoint.clone()),
                        region: Some(AWS_REGION.into()),
                        credentials: Some(StaticCredentials::new(AWS_KEY, AWS_KEY)),
                    },
                    ..QueueOptions::default()
                };
                let env = vec![
                    ("CRM_ANALYTICS_SQS_ENDPOINT", endpoint.clone()),
                    ("AWS_ACCESS_KEY_ID", AWS_KEY.into()),
                    ("AWS_SECRET_ACCESS_KEY", AWS_KEY.into()),
                    ("AWS_REGION", AWS_REGION.into()),
                ];
                (QueueSpec::Sqs(target), options, env)
            }
        };
        env.push(("CRM_ANALYTICS_QUEUE", spec.to_string()));
        Ok(FreshQueue {
            broker: self.clone(),
            spec,
            options,
            env,
        })
    }
}

/// NATS when CRM_ANALYTICS_TEST_NATS is set (it must answer then), or when the default
/// server answers.
async fn nats() -> Result<Broker, (&'static str, String)> {
    if let Some(url) = variable("CRM_ANALYTICS_TEST_NATS") {
        return Ok(Broker::Nats { url });
    }
    let answers = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(DEFAULT_NATS_ADDRESS),
    )
    .await;
    match answers {
        Ok(Ok(_)) => Ok(Broker::Nats {
            url: DEFAULT_NATS.into(),
        }),
        _ => Err((
            "nats",
            format!("CRM_ANALYTICS_TEST_NATS not set and nothing answers at {DEFAULT_NATS}"),
        )),
    }
}

fn sqs() -> Result<Broker, (&'static str, String)> {
    match variable("CRM_ANALYTICS_TEST_AWS_ENDPOINT") {
        Some(endpoint) => Ok(Broker::Sqs {
            endpoint: endpoint.trim_end_matches('/').to_string(),
        }),
        None => Err(("sqs", "CRM_ANALYTICS_TEST_AWS_ENDPOINT not set".into())),
    }
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A stream or queue of one run: how to open it here, and the settings a `crm-analytics`
/// process needs to use it.
pub struct FreshQueue {
    broker: Broker,
    pub spec: QueueSpec,
    pub options: QueueOptions,
    /// CRM_ANALYTICS_QUEUE and whatever else the backend reads (consumer, endpoint, keys).
    pub env: Vec<(&'static str, String)>,
}

impl FreshQueue {
    /// [`Broker::timeout`] of its backend.
    pub fn timeout(&self, events: i64) -> Duration {
        self.broker.timeout(events)
    }

    /// Opens it (a broker's stream or queue is created when missing).
    pub async fn open(&self, analytics: &PgPool) -> anyhow::Result<Arc<dyn Queue>> {
        Ok(crm_analytics::queue::open(&self.spec, analytics, &self.options).await?)
    }

    /// Deletes the stream (and its consumer) or the queue; the embedded queue goes with
    /// its database.
    pub async fn remove(self) -> anyhow::Result<()> {
        match (&self.broker, &self.spec) {
            (Broker::Nats { url }, QueueSpec::Nats(spec)) => {
                let client = async_nats::connect(url.as_str()).await?;
                async_nats::jetstream::new(client)
                    .delete_stream(&spec.stream)
                    .await?;
            }
            (Broker::Sqs { .. }, QueueSpec::Sqs(target)) => {
                let queue = SqsQueue::open(target, &self.options).await?;
                queue
                    .client()
                    .delete_queue()
                    .queue_url(queue.url())
                    .send()
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// [`FreshQueue::remove`], saying so instead of failing the run when it cannot.
    pub async fn remove_or_warn(self) {
        let shown = self.spec.to_string();
        if let Err(error) = self.remove().await {
            println!("  (could not remove the queue {shown}: {error:#})");
        }
    }
}
