//! Which queue backend to use: the `CRM_ANALYTICS_QUEUE` setting and its parsing.

use clap::Args;
use std::fmt;
use std::str::FromStr;

/// The queue backend and where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueueSpec {
    /// The embedded queue: a table in the analytics database.
    #[default]
    Postgres,
}

const FORMS: &str = "write postgres (the default), sqs://QUEUE (a queue name or URL) or \
                     nats://HOST:PORT[/STREAM]";

impl FromStr for QueueSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("postgres") || text.eq_ignore_ascii_case("postgresql") {
            return Ok(QueueSpec::Postgres);
        }
        Err(format!("{text:?} is not a queue; {FORMS}"))
    }
}

impl fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSpec::Postgres => f.write_str("postgres"),
        }
    }
}

/// Where the queue is, for every command that reads or writes it.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// The queue between relay and workers: postgres (a table in the analytics database,
    /// nothing to install), sqs://QUEUE (an SQS queue name or URL; credentials and region
    /// from the usual AWS_* variables) or nats://HOST:PORT[/STREAM] (NATS JetStream).
    #[arg(long = "queue", env = "CRM_ANALYTICS_QUEUE", default_value = "postgres",
          global = true, value_parser = QueueSpec::from_str)]
    pub spec: QueueSpec,

    /// How long a received batch stays leased to a worker before the queue delivers it
    /// again (SQS visibility timeout, JetStream ack wait). Brokers extend the lease while
    /// a batch is still being applied, so this bounds only how soon the batches of a
    /// worker that died come back.
    #[arg(long, env = "CRM_ANALYTICS_QUEUE_LEASE", default_value = "30s", global = true,
          value_parser = crate::config::parse_duration)]
    pub lease: std::time::Duration,
}

impl Default for QueueArgs {
    /// The embedded PostgreSQL queue with the default lease, as with no setting at all.
    fn default() -> Self {
        Self {
            spec: QueueSpec::Postgres,
            lease: super::QueueOptions::default().lease,
        }
    }
}

impl QueueArgs {
    /// The options [`super::open`] takes, with the publishers' capacity bound.
    pub fn options(&self, capacity: u64) -> super::QueueOptions {
        super::QueueOptions {
            capacity,
            lease: self.lease,
        }
    }

    /// Opens the queue with no capacity bound (status, API, `failed retry`).
    pub async fn open_unbounded(
        &self,
        analytics: &sqlx::PgPool,
    ) -> Result<std::sync::Arc<dyn super::Queue>, super::QueueError> {
        super::open(&self.spec, analytics, &self.options(u64::MAX)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_is_spelled_either_way_and_unknown_names_say_what_to_write() {
        assert_eq!("postgres".parse(), Ok(QueueSpec::Postgres));
        assert_eq!("PostgreSQL".parse(), Ok(QueueSpec::Postgres));
        let error = "kafka://x".parse::<QueueSpec>().expect_err("unknown");
        assert!(error.contains("sqs://"), "{error}");
    }
}
