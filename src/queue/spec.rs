//! Which queue backend to use: the `CRM_ANALYTICS_QUEUE` setting and its parsing, and the
//! flags every backend shares (lease, SQS endpoint).

use clap::Args;
use std::fmt;
use std::str::FromStr;

use super::nats::{NatsOptions, NatsSpec};
use crate::config::{redact_userinfo, SecretSafe};

/// The queue backend and where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueueSpec {
    /// The CRM's outbox itself, read by the workers (the analytics in the CRM's database).
    Outbox,
    /// The embedded queue: a table in the analytics database.
    #[default]
    Postgres,
    /// A NATS JetStream stream (`nats://HOST:PORT[/STREAM]`).
    Nats(NatsSpec),
    /// An Amazon SQS queue (or one on an SQS-compatible server).
    Sqs(SqsTarget),
}

const FORMS: &str = "write outbox, postgres, sqs://NAME (an SQS queue name), \
                     sqs://https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (an SQS queue URL) or \
                     nats://HOST:PORT[/STREAM]";

const SQS_FORMS: &str = "write sqs://NAME (1 to 80 letters, digits, - or _, plus .fifo for a \
                         FIFO queue; created when missing) or \
                         sqs://https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (the queue's URL)";

/// Which SQS queue: by name in the configured account and region, or by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqsTarget {
    /// Resolved with GetQueueUrl; created when missing.
    Name(String),
    /// The queue URL, `https://sqs.REGION.amazonaws.com/ACCOUNT/NAME` or a compatible
    /// server's `http://HOST:PORT/ACCOUNT/NAME`; never created.
    Url(url::Url),
}

impl SqsTarget {
    /// The queue's name (the URL's last segment).
    pub fn name(&self) -> &str {
        match self {
            SqsTarget::Name(name) => name,
            SqsTarget::Url(url) => url
                .path_segments()
                .and_then(|mut segments| segments.next_back())
                .unwrap_or_default(),
        }
    }

    /// FIFO queues are the ones whose name ends in `.fifo`.
    pub fn is_fifo(&self) -> bool {
        self.name().ends_with(".fifo")
    }

    /// The region an AWS queue URL names (`sqs.REGION.amazonaws.com`, also `.com.cn`).
    pub fn url_region(&self) -> Option<&str> {
        let SqsTarget::Url(url) = self else {
            return None;
        };
        let host = url.host_str()?;
        let rest = host.strip_prefix("sqs.")?;
        let (region, domain) = rest.split_once('.')?;
        domain.starts_with("amazonaws.").then_some(region)
    }

    /// Parses what follows `sqs://` (or a whole `http(s)://` queue URL).
    fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
            return match valid_name(text) {
                true => Ok(SqsTarget::Name(text.to_string())),
                false => Err(format!("{text:?} is not an SQS queue name; {SQS_FORMS}")),
            };
        }
        // Errors show the URL without anything before an `@`: it could be a secret.
        let shown = redact_userinfo(text);
        let url = url::Url::parse(text)
            .map_err(|e| format!("{shown:?} is not an SQS queue URL ({e}); {SQS_FORMS}"))?;
        // A queue URL carries no secrets: refuse any, so that logs and status never show one.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "an SQS queue URL takes no user or password (credentials come from the AWS_* \
                 variables, a profile or the instance role); {SQS_FORMS}"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || url.host_str().is_none() {
            return Err(format!(
                "{shown:?} is not an SQS queue URL (no host, or a query or fragment); {SQS_FORMS}"
            ));
        }
        let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
        match segments.as_slice() {
            [account, name] if !account.is_empty() && valid_name(name) => Ok(SqsTarget::Url(url)),
            _ => Err(format!(
                "{shown:?} is not an SQS queue URL: its path must be /ACCOUNT/NAME; {SQS_FORMS}"
            )),
        }
    }
}

/// SQS's rule: 1 to 80 characters of letters, digits, `-` and `_`, `.fifo` included.
fn valid_name(name: &str) -> bool {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    !base.is_empty()
        && name.len() <= 80
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl fmt::Display for SqsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqsTarget::Name(name) => write!(f, "sqs://{name}"),
            // Parsing refused user and password, so the URL holds nothing secret.
            SqsTarget::Url(url) => write!(f, "sqs://{url}"),
        }
    }
}

impl FromStr for QueueSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("postgres") || text.eq_ignore_ascii_case("postgresql") {
            return Ok(QueueSpec::Postgres);
        }
        if text.eq_ignore_ascii_case("outbox") {
            return Ok(QueueSpec::Outbox);
        }
        if let Some(rest) = strip_prefix_ignore_case(text, "sqs://") {
            return SqsTarget::parse(rest).map(QueueSpec::Sqs);
        }
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("https://") || lower.starts_with("http://") {
            return SqsTarget::parse(text).map(QueueSpec::Sqs);
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

/// `--queue`'s parser: [`QueueSpec::from_str`] behind [`SecretSafe`].
fn parse_queue(text: &str) -> Result<QueueSpec, String> {
    text.parse()
}

impl fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSpec::Outbox => f.write_str("outbox"),
            QueueSpec::Postgres => f.write_str("postgres"),
            QueueSpec::Nats(spec) => spec.fmt(f),
            QueueSpec::Sqs(target) => target.fmt(f),
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// An endpoint URL for `--sqs-endpoint`: http or https with a host.
fn parse_endpoint(text: &str) -> Result<String, String> {
    let example = "write the server's URL, e.g. http://localhost:4566";
    let shown = redact_userinfo(text);
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{shown:?}: {e}; {example}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{shown:?} is not an http(s) URL; {example}"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Refused rather than used: credentials belong where AWS's tools keep them.
        return Err(format!(
            "{shown:?}: credentials do not belong in the endpoint; give them in \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
        ));
    }
    Ok(text.trim().to_string())
}

/// Where the queue is, for every command that reads or writes it.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// The queue between the CRM's outbox and the workers: outbox (the workers read the
    /// outbox itself; nothing to install, no relay; only when the analytics live in the
    /// CRM's database), postgres (a table in the analytics database, fed by the relay),
    /// nats://HOST:PORT[/STREAM] (NATS JetStream; stream CRM_ANALYTICS
    /// by default, created when missing; tls:// for TLS, USER:PASSWORD@ or TOKEN@ before
    /// the host for credentials) or an Amazon SQS queue: sqs://NAME (a queue in the
    /// configured account and region, created when missing, with the lease as its
    /// visibility timeout; a name ending in .fifo is a FIFO queue) or the queue's URL,
    /// sqs://https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (the region is taken from it).
    /// SQS credentials and region come from the standard AWS chain: AWS_ACCESS_KEY_ID/
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE, web identity, container or instance
    /// role. Unset: outbox when ANALYTICS_DATABASE_URL is unset or equals DATABASE_URL,
    /// else postgres.
    #[arg(long = "queue", env = "CRM_ANALYTICS_QUEUE",
          global = true, hide_env_values = true, value_parser = SecretSafe(parse_queue))]
    pub spec: Option<QueueSpec>,

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

    /// SQS-compatible server to talk to instead of AWS (e.g. http://localhost:4566). Unset:
    /// AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL when set, else the queue URL's server when it
    /// is not AWS, else AWS's endpoint for the region.
    #[arg(long = "sqs-endpoint", env = "CRM_ANALYTICS_SQS_ENDPOINT", global = true,
          value_parser = SecretSafe(parse_endpoint))]
    pub sqs_endpoint: Option<String>,
}

impl Default for QueueArgs {
    /// The default queue for the databases and the default lease, as with no setting at all.
    fn default() -> Self {
        let options = super::QueueOptions::default();
        Self {
            spec: None,
            lease: options.lease,
            nats_consumer: options.nats.consumer,
            nats_subject: options.nats.subject,
            sqs_endpoint: None,
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
            sqs: super::sqs::SqsSettings {
                endpoint: self.sqs_endpoint.clone(),
                ..Default::default()
            },
            consumes: true,
            creates: true,
            keep_processed: false,
        }
    }

    /// Opens the queue `spec` (see [`crate::config::DatabaseArgs::queue_spec`]) with no
    /// capacity bound and without consuming from it (status, API, `failed retry`).
    pub async fn open_unbounded(
        &self,
        spec: &QueueSpec,
        analytics: &sqlx::PgPool,
    ) -> Result<std::sync::Arc<dyn super::Queue>, super::QueueError> {
        let options = super::QueueOptions {
            consumes: false,
            ..self.options(u64::MAX)
        };
        super::open(spec, analytics, &options).await
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
        assert_eq!(cli.queue.spec.expect("set").to_string(), "nats://h:4222/S");
    }

    fn sqs(text: &str) -> SqsTarget {
        match text.parse::<QueueSpec>() {
            Ok(QueueSpec::Sqs(target)) => target,
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn sqs_names_are_taken_as_names_and_shown_back_the_same() {
        let target = sqs("sqs://crm-events_1");
        assert_eq!(target, SqsTarget::Name("crm-events_1".into()));
        assert_eq!(target.name(), "crm-events_1");
        assert!(!target.is_fifo());
        assert_eq!(target.url_region(), None);
        assert_eq!(target.to_string(), "sqs://crm-events_1");
        assert_eq!(
            QueueSpec::Sqs(target.clone()).to_string(),
            "sqs://crm-events_1"
        );
        assert_eq!("SQS://crm-events_1".parse(), Ok(QueueSpec::Sqs(target)));

        let fifo = sqs("sqs://events.fifo");
        assert!(fifo.is_fifo());
        assert_eq!(fifo.name(), "events.fifo");
        assert_eq!(sqs(&format!("sqs://{}", "a".repeat(80))).name().len(), 80);
    }

    #[test]
    fn sqs_urls_give_the_name_and_the_region() {
        let text = "https://sqs.eu-west-1.amazonaws.com/123456789012/crm-events";
        for written in [format!("sqs://{text}"), text.to_string()] {
            let target = sqs(&written);
            assert!(matches!(target, SqsTarget::Url(_)), "{target:?}");
            assert_eq!(target.name(), "crm-events");
            assert_eq!(target.url_region(), Some("eu-west-1"));
            assert_eq!(target.to_string(), format!("sqs://{text}"));
            // What Display shows parses back to the same queue.
            assert_eq!(
                QueueSpec::Sqs(target.clone()).to_string().parse(),
                Ok(QueueSpec::Sqs(target))
            );
        }
        let local = sqs("sqs://http://127.0.0.1:4566/000000000000/q.fifo");
        assert_eq!(local.name(), "q.fifo");
        assert!(local.is_fifo());
        assert_eq!(local.url_region(), None, "not an AWS host");
        let china = sqs("sqs://https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q");
        assert_eq!(china.url_region(), Some("cn-north-1"));
    }

    #[test]
    fn bad_sqs_queues_are_refused_with_the_forms_to_write() {
        for bad in [
            "sqs://",
            "sqs://has space",
            "sqs://dots.in.name",
            "sqs://.fifo",
            "sqs://a/b",
            &format!("sqs://{}", "a".repeat(81)),
            "sqs://https://sqs.eu-west-1.amazonaws.com/crm-events",
            "sqs://https://sqs.eu-west-1.amazonaws.com/1/2/crm-events",
            "sqs://https://sqs.eu-west-1.amazonaws.com/1/crm-events?x=1",
            "sqs://ftp://host/1/q",
            "https://",
        ] {
            let error = bad.parse::<QueueSpec>().expect_err(bad);
            assert!(error.contains("sqs://NAME"), "{bad}: {error}");
        }
    }

    #[test]
    fn credentials_in_a_queue_url_are_refused_and_never_echoed() {
        let error = "sqs://https://AKIAEXAMPLE:s3cr3t@sqs.eu-west-1.amazonaws.com/1/q"
            .parse::<QueueSpec>()
            .expect_err("credentials in the URL");
        assert!(!error.contains("s3cr3t"), "{error}");
        assert!(error.contains("AWS_"), "{error}");
        let error = "https://key:s3cr3t@/1/q"
            .parse::<QueueSpec>()
            .expect_err("no host");
        assert!(!error.contains("s3cr3t"), "{error}");
    }

    #[test]
    fn sqs_endpoints_must_be_http_urls() {
        assert_eq!(
            parse_endpoint("http://localhost:4566"),
            Ok("http://localhost:4566".to_string())
        );
        assert!(parse_endpoint("localhost:4566").is_err());
        assert!(parse_endpoint("ftp://host").is_err());
        let refused = parse_endpoint("http://key:s3cr3t@localhost:4566").unwrap_err();
        assert!(
            refused.contains("AWS_ACCESS_KEY_ID") && !refused.contains("s3cr3t"),
            "{refused}"
        );
    }
}
