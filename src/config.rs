//! Config: every setting, from flags and environment variables, with documented defaults.
//!
//! Flags win over environment variables, which win over the defaults below. Each setting's
//! `--help` text says what it does; the README's configuration table lists the same.

use clap::Args;
use std::time::Duration;

use crate::archive::Layout;

/// A URL as it may be shown in an error: `scheme://user:password@host/…` becomes
/// `scheme://…@host/…`.
pub fn redact_userinfo(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}…{}", &text[..scheme_end + 3], &text[at..])
        }
        _ => text.to_string(),
    }
}

/// clap's parser for a setting whose value may hold a password (a URL with
/// `user:password@`): the wrapped function's answer, except that clap's error does not
/// repeat such a value (its own message would print the password). The function must not
/// repeat it either: its messages show [`redact_userinfo`]'s form.
#[derive(Clone)]
pub struct SecretSafe<T>(pub fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for SecretSafe<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg.map_or_else(|| "the setting".to_string(), |arg| arg.to_string());
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("the value of {name} is not UTF-8\n"),
            )
            .with_cmd(cmd)
        })?;
        (self.0)(text).map_err(|message| {
            let shown = if text.contains('@') {
                "(not shown: it may hold a password)".to_string()
            } else {
                format!("'{text}'")
            };
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value {shown} for '{name}': {message}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// Where the databases and the queue are.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The CRM's PostgreSQL database (where the outbox and triggers live).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// The database that holds the aggregates (schema `analytics`) and the queue.
    /// Defaults to DATABASE_URL.
    #[arg(
        long,
        env = "ANALYTICS_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub analytics_database_url: Option<String>,

    /// Schema of the CRM tables accounts, leads, projects and activities.
    #[arg(long, env = "CRM_ANALYTICS_CRM_SCHEMA", default_value = "public", global = true,
          value_parser = parse_identifier)]
    pub crm_schema: String,

    /// The queue between relay and workers.
    #[command(flatten)]
    pub queue: crate::queue::QueueArgs,

    /// The URLs came from --database-url / --analytics-database-url rather than the
    /// environment: error messages name the setting the user actually wrote.
    #[arg(skip)]
    pub urls_from_flags: UrlSources,
}

/// Which database URLs were given as flags (see [`DatabaseArgs::urls_from_flags`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct UrlSources {
    pub crm: bool,
    pub analytics: bool,
}

impl DatabaseArgs {
    /// The setting the CRM URL came from, for error messages.
    pub fn crm_setting(&self) -> &'static str {
        if self.urls_from_flags.crm {
            "--database-url"
        } else {
            "DATABASE_URL"
        }
    }

    /// The CRM database URL, or an error that names the setting and the fix.
    pub fn crm_url(&self) -> anyhow::Result<&str> {
        self.database_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "DATABASE_URL is not set: set it (or pass --database-url) to the CRM database, \
                 for example postgres://postgres@127.0.0.1:5432/crm"
            )
        })
    }

    /// The variable the analytics URL comes from, for error messages.
    pub fn analytics_setting(&self) -> &'static str {
        match (
            self.analytics_database_url.is_some(),
            self.urls_from_flags.analytics,
        ) {
            (true, true) => "--analytics-database-url",
            (true, false) => "ANALYTICS_DATABASE_URL",
            (false, _) => self.crm_setting(),
        }
    }

    /// Refuses the outbox as the queue with the analytics in another database: the workers
    /// would read an outbox that nothing writes.
    pub fn check_queue(&self) -> Result<(), String> {
        let separate = self
            .analytics_database_url
            .as_ref()
            .is_some_and(|analytics| Some(analytics) != self.database_url.as_ref());
        if separate && self.queue.spec == Some(crate::queue::QueueSpec::Outbox) {
            return Err(
                "CRM_ANALYTICS_QUEUE=outbox needs the analytics in the CRM's database: \
                        leave ANALYTICS_DATABASE_URL unset (or write it exactly as DATABASE_URL), \
                        or use postgres or a broker with a separate analytics database"
                    .into(),
            );
        }
        Ok(())
    }

    /// The queue: the setting, or by default the outbox itself when the analytics live in
    /// the CRM's database (no analytics URL, or the same one), else the embedded queue.
    pub fn queue_spec(&self) -> crate::queue::QueueSpec {
        use crate::queue::QueueSpec;
        match (&self.queue.spec, &self.analytics_database_url) {
            (Some(spec), _) => spec.clone(),
            (None, None) => QueueSpec::Outbox,
            (None, Some(analytics)) if Some(analytics) == self.database_url.as_ref() => {
                QueueSpec::Outbox
            }
            (None, Some(_)) => QueueSpec::Postgres,
        }
    }

    pub fn analytics_url(&self) -> anyhow::Result<&str> {
        match &self.analytics_database_url {
            Some(url) => Ok(url),
            None => self.crm_url(),
        }
    }
}

/// The HTTP server: REST API, dashboard, /metrics.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address the API server listens on: host:port, where host is an IP address or a name
    /// (localhost:8080, 0.0.0.0:8080, [::1]:8080).
    #[arg(long, env = "CRM_ANALYTICS_LISTEN", default_value = "127.0.0.1:8080",
          value_parser = parse_listen)]
    pub listen: std::net::SocketAddr,

    /// Bearer tokens accepted by /api/ routes, comma-separated.
    #[arg(
        long,
        env = "CRM_ANALYTICS_API_TOKENS",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    pub api_tokens: String,

    /// Longest time a metric response is served from the cache (0s: no cache). Any commit
    /// that changes the aggregates outdates cached responses at once (LISTEN/NOTIFY); this
    /// bounds staleness only while that notification connection is broken.
    #[arg(long, env = "CRM_ANALYTICS_API_CACHE_TTL", default_value = "1s", value_parser = parse_duration)]
    pub api_cache_ttl: Duration,

    /// The URL clients reach the API at (e.g. https://analytics.example.com, with any path
    /// prefix a proxy adds): next/previous links are absolute under it. Unset, they are
    /// relative (path and query); they are never built from a request's Host header.
    #[arg(long, env = "CRM_ANALYTICS_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
}

/// The metrics listener of `relay` and `worker`, which run no API server. (`run` and `serve`
/// serve /metrics with the API on CRM_ANALYTICS_LISTEN and do not take this setting.)
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Address to serve /metrics (Prometheus) and /healthz on, host:port (e.g.
    /// 127.0.0.1:9100, 0.0.0.0:9100). Unset: no listener.
    #[arg(long, env = "CRM_ANALYTICS_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How the pipeline runs.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Events per relay claim and per worker batch.
    #[arg(long, env = "CRM_ANALYTICS_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_size: u32,

    /// Concurrent relay loops in this process. One loop waits on a round trip most of the
    /// time (claim, publish, commit are sequential); two keep the database and the process
    /// busy at once and relayed about twice as fast in the benchmark.
    #[arg(long, env = "CRM_ANALYTICS_RELAYS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relays: u32,

    /// Concurrent workers in this process (default: two per CPU core, at most 16).
    #[arg(long, env = "CRM_ANALYTICS_WORKERS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: Option<u32>,

    /// Connections to the CRM database this process may open (default: its minimum plus 2,
    /// at most 40 unless the minimum is more; at least relays + 2, or 1 without a relay,
    /// and 1 more with the API). Checked at start against the server's free connections.
    #[arg(long, env = "CRM_ANALYTICS_CRM_POOL_SIZE", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub crm_pool_size: Option<u32>,

    /// Connections to the analytics database this process may open (default: its minimum
    /// plus 6, at most 40 unless the minimum is more; at least two per worker, one per
    /// relay loop and 2, and 2 more with the API). Checked at start against the server's
    /// free connections.
    #[arg(long, env = "CRM_ANALYTICS_ANALYTICS_POOL_SIZE", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub analytics_pool_size: Option<u32>,

    /// Safety-net poll interval when no notification arrives (e.g. 500ms, 2s).
    #[arg(long, env = "CRM_ANALYTICS_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Attempts after which an event is parked in failed_events: failed attempts on the
    /// postgres queue, deliveries on NATS and SQS.
    #[arg(long, env = "CRM_ANALYTICS_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// Delay before the first retry; doubles each attempt, each delay drawn at random between
    /// half this and the doubled value.
    #[arg(long, env = "CRM_ANALYTICS_RETRY_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub retry_backoff: Duration,

    /// Events the queue holds before the relay waits for the workers (backpressure).
    #[arg(long, env = "CRM_ANALYTICS_QUEUE_CAPACITY", default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_capacity: u64,

    /// Keep relayed outbox rows this long in crm_analytics.event_outbox_processed
    /// (0s: delete them as soon as they are relayed; the archive keeps the history).
    #[arg(long, env = "CRM_ANALYTICS_OUTBOX_RETENTION", default_value = "0s", value_parser = parse_duration)]
    pub outbox_retention: Duration,

    /// Longest a relay's CRM transaction waits on one step: the claim, the publish to the
    /// queue, the commit (statement_timeout and idle_in_transaction_session_timeout of that
    /// transaction, and a publish timeout). While it is open it holds back the CRM's xmin
    /// horizon; past the bound it rolls back, its events stay in the outbox and the relay
    /// retries. 0s: no bound.
    #[arg(long, env = "CRM_ANALYTICS_RELAY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub relay_timeout: Duration,

    /// How long applied event ids are remembered to drop duplicate deliveries (at least
    /// 1h; ids of events still waiting in the outbox are kept however old).
    #[arg(long, env = "CRM_ANALYTICS_DEDUP_RETENTION", default_value = "24h",
          value_parser = parse_dedup_retention)]
    pub dedup_retention: Duration,

    /// How often this process vacuums the queue tables it drains (the outbox for a relay,
    /// the embedded queue for workers), so that deleted rows do not slow down claims even
    /// where autovacuum is slow or off. 0s leaves it to autovacuum.
    #[arg(long, env = "CRM_ANALYTICS_VACUUM_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub vacuum_interval: Duration,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Archive objects: one per batch, table and day (batch), or one per event (event).
    #[arg(long, env = "CRM_ANALYTICS_ARCHIVE_LAYOUT", value_enum, default_value_t = Layout::Batch)]
    pub archive_layout: Layout,
}

/// Where the archive is, as the pipeline writes it and `replay` reads it back.
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// Where raw events are archived: a folder, file:///path, s3://bucket/prefix, or "none".
    #[arg(
        long = "archive",
        id = "archive",
        value_name = "URL",
        env = "CRM_ANALYTICS_ARCHIVE",
        default_value = DEFAULT_ARCHIVE
    )]
    pub location: String,

    /// The S3-compatible server of an s3:// archive (MinIO, Ceph, R2, ...), e.g.
    /// http://127.0.0.1:9000; http:// is allowed, requests are path-style. Unset: AWS S3, or
    /// AWS_ENDPOINT_URL. Credentials and region come from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_REGION.
    #[arg(long, env = "CRM_ANALYTICS_S3_ENDPOINT", value_parser = SecretSafe(crate::archive::parse_endpoint))]
    pub s3_endpoint: Option<String>,
}

/// `replay`: what to recompute and where the archive is.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Recompute only the rows owned by this day and later (YYYY-MM-DD, UTC). Without
    /// --from and --to, every aggregate is replaced.
    #[arg(long, value_parser = parse_date)]
    pub from: Option<chrono::NaiveDate>,

    /// Recompute only the rows owned by this day and earlier (YYYY-MM-DD, UTC).
    #[arg(long, value_parser = parse_date)]
    pub to: Option<chrono::NaiveDate>,

    #[command(flatten)]
    pub archive: ArchiveArgs,

    /// Replace the aggregates even when events the idempotency ledger records as applied
    /// are missing from the archive (they are then left out of the aggregates for good).
    #[arg(long)]
    pub allow_incomplete: bool,
}

/// CRM_ANALYTICS_ARCHIVE's default: a folder beside where the process runs.
pub const DEFAULT_ARCHIVE: &str = "./crm-analytics-archive";

/// A date, YYYY-MM-DD.
pub fn parse_date(text: &str) -> Result<chrono::NaiveDate, String> {
    let example = "write YYYY-MM-DD, e.g. 2026-03-01";
    // chrono alone would take 26-03-01 as the year 26 and 2026-3-1 as well.
    let shaped = text.len() == 10
        && text.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !shaped {
        return Err(format!("{text:?} is not a date; {example}"));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|e| format!("{text:?} is not a date ({e}); {example}"))
}

/// Most workers a process runs unless CRM_ANALYTICS_WORKERS says otherwise.
pub const DEFAULT_WORKERS_CAP: usize = 16;

impl PipelineArgs {
    pub fn workers(&self) -> usize {
        self.workers.map_or_else(default_workers, |w| w as usize)
    }
}

/// Workers a process runs unless CRM_ANALYTICS_WORKERS says otherwise: two per CPU core, at
/// most [`DEFAULT_WORKERS_CAP`]. A worker waits on the database about half of each batch
/// (claim, statements, commit) and works in this process the other half; two per core keep
/// the cores busy (the benchmark's drain section measures one per core beside the default).
/// At most 16: each worker holds up to two analytics connections,
/// and a large host must not exhaust the server's max_connections by default.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(2)
        .min(DEFAULT_WORKERS_CAP)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 500ms, 30s, 5m or 7d"))
}

/// The shortest CRM_ANALYTICS_DEDUP_RETENTION accepted.
pub const MIN_DEDUP_RETENTION: Duration = Duration::from_secs(3600);

/// CRM_ANALYTICS_DEDUP_RETENTION: a duration of at least [`MIN_DEDUP_RETENTION`]. A broker
/// delivers again a message whose acknowledgement was lost (after a lease, or later: a
/// standard SQS queue may deliver a copy at any time); an id forgotten before that copy
/// arrives would let it count twice.
pub fn parse_dedup_retention(text: &str) -> Result<Duration, String> {
    let retention = parse_duration(text)?;
    if retention < MIN_DEDUP_RETENTION {
        return Err(format!(
            "{text} is too short: a queue may deliver an applied event again after its \
             acknowledgement was lost, and an event id forgotten by then would be counted \
             twice; write at least 1h (the default 24h suits most installations)"
        ));
    }
    Ok(retention)
}

/// A listen address: `host:port`, the host an IP address or a name that resolves (the
/// first address it resolves to is used).
pub fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let example = "write host:port, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080";
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is not host:port; {example}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?} is not host:port; {example}"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{host:?} resolves to no address; {example}")),
        Err(e) => Err(format!("cannot resolve {host:?} ({e}); {example}")),
    }
}

/// An http(s) URL without query, fragment or credentials, normalized without a trailing
/// slash, so that "{url}/api/..." is a well-formed link.
pub fn parse_public_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| {
        format!("{text:?} is not a URL ({e}); write scheme, host and an optional path, e.g. https://analytics.example.com")
    })?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if plain {
        Ok(url.as_str().trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "{text:?} is not a plain http(s) URL; write scheme, host and an optional path, \
             e.g. https://analytics.example.com"
        ))
    }
}

/// A plain SQL identifier, so that it can be spliced into DDL safely.
pub fn parse_identifier(text: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && text.len() <= 63;
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a plain lowercase schema name (letters, digits, underscore)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_addresses_and_host_names() {
        assert_eq!(
            parse_listen("127.0.0.1:8181"),
            Ok("127.0.0.1:8181".parse().expect("addr"))
        );
        let local = parse_listen("localhost:8181").expect("localhost resolves");
        assert!(local.ip().is_loopback() && local.port() == 8181, "{local}");
        assert_eq!(
            parse_listen("[::1]:80"),
            Ok("[::1]:80".parse().expect("addr"))
        );
        for bad in ["localhost", "localhost:http", ":8080", "localhost:99999"] {
            let error = parse_listen(bad).expect_err(bad);
            assert!(error.contains("e.g. 127.0.0.1:8080"), "{error}");
        }
    }

    #[test]
    fn a_date_must_be_written_in_full() {
        assert_eq!(
            parse_date("2026-03-01"),
            Ok(chrono::NaiveDate::from_ymd_opt(2026, 3, 1).expect("date"))
        );
        for bad in [
            "26-03-01",
            "2026-3-1",
            " 2026-03-01",
            "+2026-03-01",
            "2026-02-30",
        ] {
            let error = parse_date(bad).expect_err(bad);
            assert!(error.contains("YYYY-MM-DD"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_dedup_retention_too_short_for_redeliveries_is_refused_saying_why() {
        assert_eq!(
            parse_dedup_retention("24h"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(parse_dedup_retention("1h"), Ok(MIN_DEDUP_RETENTION));
        for short in ["0s", "59m", "10s"] {
            let error = parse_dedup_retention(short).expect_err(short);
            assert!(
                error.contains("counted twice") && error.contains("at least 1h"),
                "{error}"
            );
        }
    }
}

#[cfg(test)]
mod public_url_tests {
    use super::parse_public_url;

    #[test]
    fn public_urls_are_plain_http_urls_without_a_trailing_slash() {
        assert_eq!(
            parse_public_url("https://analytics.example.com/").unwrap(),
            "https://analytics.example.com"
        );
        assert_eq!(
            parse_public_url("http://10.0.0.5:8080/crm/").unwrap(),
            "http://10.0.0.5:8080/crm"
        );
        for bad in [
            "analytics.example.com",
            "ftp://example.com",
            "https://example.com/?a=b",
            "https://example.com/#x",
            "https://user:pw@example.com",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }
}
