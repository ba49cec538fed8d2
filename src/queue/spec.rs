//! Which queue backend to use: the `CRM_ANALYTICS_QUEUE` setting and its parsing.

use clap::Args;
use std::fmt;
use std::str::FromStr;

use super::nats::{NatsOptions, NatsSpec};

/// The queue backend and where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueueSpec {
    /// The embedded queue: a table in the analytics database.
    #[default]
    Postgres,
    /// A NATS JetStream stream (`nats://HOST:PORT[/STREAM]`).
    Nats(NatsSpec),
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
        let scheme = text
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("nats" | "tls")) {
            return text.parse().map(QueueSpec::Nats);
        }
        if scheme.is_some() && text.contains('@') {
            // Do not repeat what may be a password.
            return Err(format!("this URL is not a queue; {FORMS}"));
        }
        Err(format!("{text:?} is not a queue; {FORMS}"))
    }
}

/// clap's parser for `--queue`: as [`QueueSpec::from_str`], except that an error about a URL
/// with credentials does not repeat the URL (clap's own message would print the password).
#[derive(Clone)]
pub struct QueueSpecParser;

impl clap::builder::TypedValueParser for QueueSpecParser {
    type Value = QueueSpec;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<QueueSpec, clap::Error> {
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                "CRM_ANALYTICS_QUEUE is not UTF-8\n",
            )
            .with_cmd(cmd)
        })?;
        text.parse().map_err(|message: String| {
            let shown = if text.contains('@') {
                "(not shown: it may hold a password)".to_string()
            } else {
                format!("'{text}'")
            };
            let arg = arg.map_or("--queue".to_string(), |arg| arg.to_string());
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value {shown} for '{arg}': {message}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

impl fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSpec::Postgres => f.write_str("postgres"),
            QueueSpec::Nats(spec) => spec.fmt(f),
        }
    }
}

/// Where the queue is, for every command that reads or writes it.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// The queue between relay and workers: postgres (a table in the analytics database,
    /// nothing to install), sqs://QUEUE (an SQS queue name or URL; credentials and region
    /// from the usual AWS_* variables) or nats://HOST:PORT[/STREAM] (NATS JetStream; stream
    /// CRM_ANALYTICS by default, created when missing; tls:// for TLS, USER:PASSWORD@ or
    /// TOKEN@ before the host for credentials).
    #[arg(long = "queue", env = "CRM_ANALYTICS_QUEUE", default_value = "postgres",
          global = true, hide_env_values = true, value_parser = QueueSpecParser)]
    pub spec: QueueSpec,

    /// The durable JetStream consumer the workers share, created when missing (NATS only).
    #[arg(long, env = "CRM_ANALYTICS_NATS_CONSUMER", value_name = "NAME",
          default_value = super::nats::DEFAULT_CONSUMER,
          global = true, value_parser = super::nats::parse_consumer)]
    pub nats_consumer: String,

    /// The subject events are published on and the consumer filters (NATS only; default:
    /// STREAM.events, so that two streams on one server never share a subject).
    #[arg(long, env = "CRM_ANALYTICS_NATS_SUBJECT", value_name = "SUBJECT", global = true,
          value_parser = super::nats::parse_subject)]
    pub nats_subject: Option<String>,

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
        let options = super::QueueOptions::default();
        Self {
            spec: QueueSpec::Postgres,
            lease: options.lease,
            nats_consumer: options.nats.consumer,
            nats_subject: options.nats.subject,
        }
    }
}

impl QueueArgs {
    /// The options [`super::open`] takes, with the publishers' capacity bound.
    pub fn options(&self, capacity: u64) -> super::QueueOptions {
        super::QueueOptions {
            capacity,
            lease: self.lease,
            nats: NatsOptions {
                consumer: self.nats_consumer.clone(),
                subject: self.nats_subject.clone(),
            },
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

    #[test]
    fn nats_urls_parse_and_show_no_secret() {
        let spec: QueueSpec = "nats://127.0.0.1:4222/EVENTS".parse().expect("nats");
        assert_eq!(spec.to_string(), "nats://127.0.0.1:4222/EVENTS");
        let spec: QueueSpec = "NATS://u:pw@h".parse().expect("nats");
        assert_eq!(spec.to_string(), "nats://u:***@h:4222/CRM_ANALYTICS");
        assert!(!format!("{spec:?}").contains("pw"));
        let error = "kafka://u:pw@h".parse::<QueueSpec>().expect_err("unknown");
        assert!(!error.contains("pw"), "{error}");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        queue: QueueArgs,
    }

    #[test]
    fn a_bad_queue_url_with_a_password_is_not_echoed() {
        use clap::Parser;
        let error = Cli::try_parse_from(["x", "--queue", "nats://u:s3cret@h:x/S"])
            .err()
            .expect("a bad port")
            .to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(
            error.contains("--queue") && error.contains("port"),
            "{error}"
        );
        let error = Cli::try_parse_from(["x", "--queue", "nats://h/A.B"])
            .err()
            .expect("a bad stream")
            .to_string();
        assert!(error.contains("'nats://h/A.B'"), "{error}");
        let cli = Cli::try_parse_from(["x", "--queue", "nats://h/S", "--nats-consumer", "w1"])
            .expect("parses");
        let options = cli.queue.options(7);
        assert_eq!(
            (options.capacity, options.nats.consumer.as_str()),
            (7, "w1")
        );
        assert_eq!(cli.queue.spec.to_string(), "nats://h:4222/S");
    }
}
