//! Where the NATS JetStream queue is and what it is called: the `nats://HOST:PORT[/STREAM]`
//! form of `CRM_ANALYTICS_QUEUE` ([`NatsSpec`]), the consumer and subject settings
//! ([`NatsOptions`]) and the checks on their names. Credentials written in the URL are kept
//! out of every Display and Debug output.

use std::fmt;
use std::str::FromStr;

/// The stream when the URL names none.
pub const DEFAULT_STREAM: &str = "CRM_ANALYTICS";
/// The durable consumer every worker process shares when none is set.
pub const DEFAULT_CONSUMER: &str = "crm-analytics-workers";
const DEFAULT_PORT: u16 = 4222;

/// How the client proves who it is, from the URL's user part.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `nats://USER:PASSWORD@HOST`.
    UserPassword { user: String, password: String },
    /// `nats://TOKEN@HOST`.
    Token(String),
}

impl fmt::Debug for Credentials {
    /// The user name at most: never a password or a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// A NATS server with JetStream and the stream the queue lives in.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsSpec {
    /// `nats://HOST:PORT` or `tls://HOST:PORT`, without credentials.
    pub server: String,
    pub stream: String,
    pub credentials: Option<Credentials>,
}

impl NatsSpec {
    /// The stream `stream` on `server` (a URL without a path), for tests and tools.
    pub fn new(server: &str, stream: &str) -> Result<Self, String> {
        let mut spec: NatsSpec = server.parse()?;
        check_name(
            stream,
            "stream",
            "CRM_ANALYTICS_QUEUE (nats://HOST:PORT/STREAM)",
        )?;
        spec.stream = stream.to_string();
        Ok(spec)
    }
}

impl FromStr for NatsSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        const FORM: &str = "write nats://HOST:PORT[/STREAM] (or tls://…; user:password@ or \
                            token@ before the host when the server asks for credentials)";
        let url = url::Url::parse(text.trim()).map_err(|error| {
            // The text may hold a password: say what is wrong without repeating it.
            format!("CRM_ANALYTICS_QUEUE is not a NATS URL ({error}); {FORM}")
        })?;
        let scheme = url.scheme().to_ascii_lowercase();
        if scheme != "nats" && scheme != "tls" {
            return Err(format!(
                "CRM_ANALYTICS_QUEUE: {scheme}:// is not a NATS URL; {FORM}"
            ));
        }
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| format!("CRM_ANALYTICS_QUEUE names no NATS host; {FORM}"))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "CRM_ANALYTICS_QUEUE: a NATS URL takes no ?query or #fragment (the consumer and \
                 subject are CRM_ANALYTICS_NATS_CONSUMER and CRM_ANALYTICS_NATS_SUBJECT); {FORM}"
            ));
        }
        let path = url.path().trim_matches('/');
        let stream = if path.is_empty() {
            DEFAULT_STREAM.to_string()
        } else {
            check_name(
                path,
                "stream",
                "CRM_ANALYTICS_QUEUE (nats://HOST:PORT/STREAM)",
            )?;
            path.to_string()
        };
        let decode = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| {
                    "CRM_ANALYTICS_QUEUE: the credentials in the NATS URL are not UTF-8 once \
                     percent-decoded"
                        .to_string()
                })
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(Credentials::UserPassword {
                user: decode(user)?,
                password: decode(password)?,
            }),
            (token, None) => Some(Credentials::Token(decode(token)?)),
        };
        Ok(NatsSpec {
            server: format!("{scheme}://{host}:{}", url.port().unwrap_or(DEFAULT_PORT)),
            stream,
            credentials,
        })
    }
}

impl fmt::Display for NatsSpec {
    /// The URL with the user name at most: never a password or a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, rest) = self
            .server
            .split_once("://")
            .unwrap_or(("nats", self.server.as_str()));
        let who = match &self.credentials {
            None => String::new(),
            Some(Credentials::UserPassword { user, .. }) => format!("{user}:***@"),
            Some(Credentials::Token(_)) => "***@".to_string(),
        };
        write!(f, "{scheme}://{who}{rest}/{}", self.stream)
    }
}

impl fmt::Debug for NatsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NatsSpec({self})")
    }
}

/// What the workers consume and the relay publishes to, beside the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// The durable pull consumer all worker processes share (CRM_ANALYTICS_NATS_CONSUMER).
    pub consumer: String,
    /// The subject events are published on (CRM_ANALYTICS_NATS_SUBJECT); None: `STREAM.events`,
    /// so that streams of different deployments on one server never share a subject.
    pub subject: Option<String>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            consumer: DEFAULT_CONSUMER.to_string(),
            subject: None,
        }
    }
}

impl NatsOptions {
    /// The subject to publish on for `stream`.
    pub fn subject_for(&self, stream: &str) -> String {
        self.subject
            .clone()
            .unwrap_or_else(|| format!("{stream}.events"))
    }
}

/// Checks a stream or consumer name as the server does: not empty, at most 255 characters,
/// no whitespace or control characters, and none of `.`, `*`, `>` (subject syntax) or `/`,
/// `\` (the server names files after them).
pub fn check_name(name: &str, what: &str, setting: &str) -> Result<(), String> {
    let bad = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(*c));
    if name.is_empty() || name.len() > 255 || bad.is_some() {
        let why = match bad {
            Some(c) => format!("it contains {c:?}"),
            None if name.is_empty() => "it is empty".to_string(),
            None => "it is longer than 255 characters".to_string(),
        };
        return Err(format!(
            "{name:?} is not a NATS {what} name ({why}); set {setting} to letters, digits, - and _"
        ));
    }
    Ok(())
}

/// Checks a subject to publish on: dot-separated non-empty tokens without wildcards or
/// whitespace.
pub fn check_subject(subject: &str) -> Result<(), String> {
    let valid = !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{subject:?} is not a NATS subject to publish on; set CRM_ANALYTICS_NATS_SUBJECT to \
             dot-separated words without spaces or wildcards, like crm_analytics.events"
        ))
    }
}

/// clap parser for CRM_ANALYTICS_NATS_CONSUMER.
pub fn parse_consumer(text: &str) -> Result<String, String> {
    check_name(text, "consumer", "CRM_ANALYTICS_NATS_CONSUMER")?;
    Ok(text.to_string())
}

/// clap parser for CRM_ANALYTICS_NATS_SUBJECT.
pub fn parse_subject(text: &str) -> Result<String, String> {
    check_subject(text)?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_defaults_and_the_port_too() {
        let spec: NatsSpec = "nats://127.0.0.1".parse().expect("parses");
        assert_eq!(spec.server, "nats://127.0.0.1:4222");
        assert_eq!(spec.stream, DEFAULT_STREAM);
        let spec: NatsSpec = "nats://nats.internal:4333/EVENTS_1"
            .parse()
            .expect("parses");
        assert_eq!(spec.server, "nats://nats.internal:4333");
        assert_eq!(spec.stream, "EVENTS_1");
        assert_eq!(spec.to_string(), "nats://nats.internal:4333/EVENTS_1");
    }

    #[test]
    fn credentials_are_read_but_never_shown() {
        let spec: NatsSpec = "nats://app:s%40cret@host:4222/S".parse().expect("parses");
        assert_eq!(
            spec.credentials,
            Some(Credentials::UserPassword {
                user: "app".into(),
                password: "s@cret".into()
            })
        );
        let shown = format!("{spec} {spec:?}");
        assert!(!shown.contains("cret"), "{shown}");
        assert!(shown.contains("app:***@host"), "{shown}");
        let spec: NatsSpec = "tls://t0ken@host/S".parse().expect("parses");
        assert_eq!(spec.credentials, Some(Credentials::Token("t0ken".into())));
        let shown = format!("{spec} {spec:?}");
        assert!(!shown.contains("t0ken"), "{shown}");
        // A malformed URL's error does not repeat the password either.
        let error = "nats://app:s3cret@host:notaport"
            .parse::<NatsSpec>()
            .expect_err("bad");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn bad_names_say_which_setting_to_fix() {
        let error = "nats://h/a.b".parse::<NatsSpec>().expect_err("dot");
        assert!(
            error.contains("CRM_ANALYTICS_QUEUE") && error.contains("'.'"),
            "{error}"
        );
        let error = "nats://h/a/b"
            .parse::<NatsSpec>()
            .expect_err("two segments");
        assert!(error.contains("stream name"), "{error}");
        let error = "nats://h/S?consumer=x"
            .parse::<NatsSpec>()
            .expect_err("query");
        assert!(error.contains("CRM_ANALYTICS_NATS_CONSUMER"), "{error}");
        let error = parse_consumer("my workers").expect_err("space");
        assert!(error.contains("CRM_ANALYTICS_NATS_CONSUMER"), "{error}");
        assert!(parse_consumer("w>").is_err() && parse_consumer("").is_err());
        assert_eq!(parse_consumer("crm-workers_2"), Ok("crm-workers_2".into()));
        let error = parse_subject("events.*").expect_err("wildcard");
        assert!(error.contains("CRM_ANALYTICS_NATS_SUBJECT"), "{error}");
        assert!(parse_subject("a..b").is_err() && parse_subject("a b").is_err());
        assert_eq!(parse_subject("crm.events"), Ok("crm.events".into()));
    }

    #[test]
    fn the_default_subject_follows_the_stream() {
        let options = NatsOptions::default();
        assert_eq!(options.subject_for("S1"), "S1.events");
        let options = NatsOptions {
            subject: Some("x.y".into()),
            ..NatsOptions::default()
        };
        assert_eq!(options.subject_for("S1"), "x.y");
    }
}
