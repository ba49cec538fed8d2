//! Database connections, with errors that say which setting to fix.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// Longest wait for a new connection to be established (TCP, TLS, login): an address that
/// never answers fails after this instead of the operating system's much longer timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a pool to `url`; `setting` names where the URL came from (a variable or a flag).
pub async fn connect(url: &str, setting: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = parse_url(url, setting)?;
    let options = plain_on_loopback(url, options);
    let failed = |e: sqlx::Error| connect_error(url, setting, &options, e);
    // One direct attempt first, so that a wrong address fails at once instead of after the
    // pool's acquire timeout.
    connect_once(url, setting, &options)
        .await?
        .close()
        .await
        .map_err(failed)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options.clone())
        .await
        .map_err(failed)
}

/// A pool that connects only when first used: for a part that may never use it, such as a
/// queue broker opened (it keeps nothing there) while the analytics database is down.
pub fn connect_lazy(url: &str, setting: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = plain_on_loopback(url, parse_url(url, setting)?);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(options))
}

/// One connection, within CONNECT_TIMEOUT.
async fn connect_once(
    url: &str,
    setting: &str,
    options: &PgConnectOptions,
) -> anyhow::Result<PgConnection> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(connected) => connected.map_err(|e| connect_error(url, setting, options, e)),
        Err(_) => Err(anyhow::anyhow!(
            "cannot connect to PostgreSQL at {} ({setting}): no answer within \
             {CONNECT_TIMEOUT:?}. Check that the address is right and PostgreSQL is running \
             and reachable, or fix {setting}",
            redact(url)
        )),
    }
}

const EXPECTED_FORM: &str = "postgres://user:password@host:5432/database";

/// Parses a PostgreSQL URL, refusing what the driver would misread: without a scheme,
/// `localhost:5432/crm` would name the database `5432/crm`.
pub fn parse_url(url: &str, setting: &str) -> anyhow::Result<PgConnectOptions> {
    let scheme_ok = url::Url::parse(url)
        .map(|u| matches!(u.scheme(), "postgres" | "postgresql"))
        .unwrap_or(false);
    if !scheme_ok {
        anyhow::bail!(
            "{setting} is not a PostgreSQL URL: {:?} must start with postgres:// or \
             postgresql://; expected {EXPECTED_FORM}",
            redact(url)
        );
    }
    PgConnectOptions::from_str(url).map_err(|e| {
        anyhow::anyhow!("{setting} is not a valid PostgreSQL URL ({e}); expected {EXPECTED_FORM}")
    })
}

/// What went wrong when connecting, and what to do about it.
fn connect_error(
    url: &str,
    setting: &str,
    options: &PgConnectOptions,
    error: sqlx::Error,
) -> anyhow::Error {
    let at = redact(url);
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    match code.as_deref() {
        // invalid_catalog_name: the server answered, the database is not there.
        Some("3D000") => {
            let name = options.get_database().unwrap_or("?");
            anyhow::anyhow!(
                "the database {name:?} does not exist on the PostgreSQL server at {at} \
                 ({setting}). Create it (`createdb -h {host} -p {port} -U {user} '{shell}'`, \
                 or `CREATE DATABASE {sql};` in psql) or fix {setting}",
                shell = name.replace('\'', "'\\''"),
                sql = quote_identifier(name),
                host = options.get_host(),
                port = options.get_port(),
                user = options.get_username(),
            )
        }
        // invalid_authorization_specification, invalid_password.
        Some("28000") | Some("28P01") => anyhow::anyhow!(
            "PostgreSQL at {at} refused the login ({setting}): {error}. Fix the user or \
             password in {setting}"
        ),
        _ => anyhow::anyhow!(
            "cannot connect to PostgreSQL at {at} ({setting}): {error}. Start PostgreSQL or \
             fix {setting}"
        ),
    }
}

/// A pool about to be opened, with the settings that decide it (for the messages).
pub struct PoolRequest<'a> {
    pub url: &'a str,
    pub url_setting: &'a str,
    pub size: u32,
    pub size_setting: &'a str,
}

/// Fails with the settings to change when a PostgreSQL server cannot take the pools that
/// will connect to it: pools to the same server add up (localhost, 127.0.0.1 and ::1 are
/// one), and the room is max_connections, less the slots reserved for others (see
/// [`Slots::room`]), less the client connections open right now.
pub async fn check_room(requests: &[PoolRequest<'_>]) -> anyhow::Result<()> {
    let mut servers: Vec<(String, u16, Vec<&PoolRequest<'_>>)> = Vec::new();
    for request in requests {
        let options = parse_url(request.url, request.url_setting)?;
        let (host, port) = (server_key(options.get_host()), options.get_port());
        match servers
            .iter_mut()
            .find(|(h, p, _)| *h == host && *p == port)
        {
            Some((_, _, pools)) => pools.push(request),
            None => servers.push((host, port, vec![request])),
        }
    }
    for (host, port, pools) in servers {
        let first = pools[0];
        let options = plain_on_loopback(first.url, parse_url(first.url, first.url_setting)?);
        let unreachable = |e: sqlx::Error| connect_error(first.url, first.url_setting, &options, e);
        let mut conn = connect_once(first.url, first.url_setting, &options).await?;
        // reserved_connections (PostgreSQL 16+) is NULL where the setting does not exist;
        // membership of pg_use_reserved_connections is asked only where that role exists.
        let read = async {
            let (max, superuser_reserved, reserved, superuser, in_use): (
                i32,
                i32,
                Option<i32>,
                bool,
                i64,
            ) = sqlx::query_as(
                "SELECT current_setting('max_connections')::int4,
                        current_setting('superuser_reserved_connections')::int4,
                        current_setting('reserved_connections', true)::int4,
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                        (SELECT count(*) FROM pg_stat_activity
                          WHERE backend_type = 'client backend')",
            )
            .fetch_one(&mut conn)
            .await?;
            let may_use_reserved: Option<bool> = sqlx::query_scalar(
                "SELECT pg_has_role(oid, 'MEMBER') FROM pg_roles
                  WHERE rolname = 'pg_use_reserved_connections'",
            )
            .fetch_optional(&mut conn)
            .await?;
            Ok::<_, sqlx::Error>(Slots {
                max,
                superuser_reserved,
                reserved: reserved.unwrap_or(0),
                superuser,
                may_use_reserved: may_use_reserved.unwrap_or(false),
                in_use,
            })
        };
        let slots = tokio::time::timeout(CONNECT_TIMEOUT, read)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot read max_connections at {host}:{port}: no answer within \
                     {CONNECT_TIMEOUT:?}"
                )
            })?
            .map_err(|e| anyhow::anyhow!("cannot read max_connections at {host}:{port}: {e}"))?;
        conn.close().await.map_err(unreachable)?;
        let room = slots.room();
        let wanted: i64 = pools.iter().map(|p| i64::from(p.size)).sum();
        if wanted > room {
            let sizes: Vec<String> = pools
                .iter()
                .map(|p| format!("{}={}", p.size_setting, p.size))
                .collect();
            let settings: Vec<&str> = pools.iter().map(|p| p.size_setting).collect();
            anyhow::bail!(
                "the connection pools need up to {wanted} connections to the PostgreSQL server at \
                 {host}:{port} ({}), but it has room for {} more (max_connections {}, \
                 {} reserved for other roles, {} in use): lower {} (or \
                 CRM_ANALYTICS_WORKERS), or raise max_connections on the server",
                sizes.join(", "),
                room.max(0),
                slots.max,
                slots.reserved_for_others(),
                slots.in_use - 1,
                settings.join(" or ")
            );
        }
    }
    Ok(())
}

/// The server's connection slots as seen by our role.
#[derive(Debug, Clone, Copy)]
struct Slots {
    max: i32,
    superuser_reserved: i32,
    /// reserved_connections (PostgreSQL 16+; 0 before).
    reserved: i32,
    superuser: bool,
    /// Member of pg_use_reserved_connections (PostgreSQL 16+).
    may_use_reserved: bool,
    /// Client connections open, this check's own included.
    in_use: i64,
}

impl Slots {
    /// Slots our role cannot use: superusers use all; other roles lose the superuser
    /// slots, and the reserved_connections slots unless they may use those.
    fn reserved_for_others(&self) -> i32 {
        if self.superuser {
            return 0;
        }
        let reserved = if self.may_use_reserved {
            0
        } else {
            self.reserved
        };
        self.superuser_reserved + reserved
    }

    /// Connections our pools may still open (this check's own connection, closed again,
    /// does not count).
    fn room(&self) -> i64 {
        i64::from(self.max) - i64::from(self.reserved_for_others()) - (self.in_use - 1)
    }
}

/// One name per server for adding up pools: the loopback names (localhost, 127.0.0.1,
/// ::1, [::1]) are the same server; other hosts compare case-insensitively.
fn server_key(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        "localhost".to_string()
    } else {
        host.to_ascii_lowercase()
    }
}

/// Connections to this same host skip TLS unless the URL (sslmode=...) or PGSSLMODE asks
/// for it: encrypting traffic that never leaves the machine protects nothing, and on the
/// default single-host setup it cost about a quarter of the drain throughput.
fn plain_on_loopback(url: &str, options: PgConnectOptions) -> PgConnectOptions {
    let asked = std::env::var_os("PGSSLMODE").is_some()
        || url::Url::parse(url)
            .map(|u| {
                u.query_pairs()
                    .any(|(key, _)| key == "sslmode" || key == "ssl-mode")
            })
            .unwrap_or(true);
    let host = options
        .get_host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if asked || !loopback {
        return options;
    }
    options.ssl_mode(PgSslMode::Disable)
}

/// `name` as a SQL identifier, quoted where it must be.
fn quote_identifier(name: &str) -> String {
    let plain = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// The URL without its password, for messages and logs. Anything that is not a
/// well-formed URL with a host loses everything before its last `@` (the credentials, if
/// any) instead.
pub fn redact(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.has_host() {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            // The driver also takes the password as a query parameter.
            if parsed.query_pairs().any(|(key, _)| key == "password") {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(key, value)| {
                        let value = if key == "password" {
                            "***".into()
                        } else {
                            value
                        };
                        (key.into_owned(), value.into_owned())
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            return parsed.to_string();
        }
    }
    match url.rsplit_once('@') {
        Some((_, rest)) => format!("***@{rest}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        let options = PgConnectOptions::from_str(url).expect("url");
        plain_on_loopback(url, options).get_ssl_mode()
    }

    #[test]
    fn urls_without_a_scheme_are_refused_with_the_expected_form() {
        let error = parse_url("localhost:5432/postgres", "--database-url")
            .expect_err("no scheme")
            .to_string();
        assert!(error.contains("--database-url"), "{error}");
        assert!(error.contains(EXPECTED_FORM), "{error}");
        let error = parse_url("mysql://u@h/db", "DATABASE_URL")
            .expect_err("wrong scheme")
            .to_string();
        assert!(error.contains("postgres://"), "{error}");
        assert!(parse_url("postgres://u@h:5432/db", "DATABASE_URL").is_ok());
        assert!(parse_url("postgresql://u@h/db", "DATABASE_URL").is_ok());
    }

    #[test]
    fn database_names_are_quoted_where_they_must_be() {
        assert_eq!(quote_identifier("crm"), "crm");
        assert_eq!(quote_identifier("My-CRM"), "\"My-CRM\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert!(!redact("u:secret@h/db").contains("secret"));
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=secret"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
    }

    #[test]
    fn loopback_names_are_one_server() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "[::1]",
        ] {
            assert_eq!(server_key(host), "localhost", "{host}");
        }
        assert_eq!(server_key("DB.example.com"), "db.example.com");
        assert_ne!(server_key("10.0.0.1"), server_key("localhost"));
    }

    #[test]
    fn reserved_connections_count_unless_the_role_may_use_them() {
        let slots = Slots {
            max: 100,
            superuser_reserved: 3,
            reserved: 5,
            superuser: false,
            may_use_reserved: false,
            in_use: 11,
        };
        assert_eq!(slots.room(), 100 - 3 - 5 - 10);
        let member = Slots {
            may_use_reserved: true,
            ..slots
        };
        assert_eq!(member.room(), 100 - 3 - 10);
        let superuser = Slots {
            superuser: true,
            ..slots
        };
        assert_eq!(superuser.room(), 100 - 10);
    }

    #[test]
    fn loopback_skips_tls_unless_asked() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return; // the environment decides
        }
        assert!(matches!(
            mode("postgres://u@127.0.0.1:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@localhost/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@[::1]:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@db.example.com/db"),
            PgSslMode::Prefer
        ));
    }
}
