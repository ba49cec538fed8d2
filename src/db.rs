//! Database connections, with errors that say which setting to fix.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// Connects a pool to `url`; `setting` names where the URL came from (a variable or a flag).
pub async fn connect(url: &str, setting: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = parse_url(url, setting)?;
    let options = plain_on_loopback(url, options);
    let failed = |e: sqlx::Error| connect_error(url, setting, &options, e);
    // One direct attempt first, so that a wrong address fails at once instead of after the
    // pool's acquire timeout.
    PgConnection::connect_with(&options)
        .await
        .map_err(failed)?
        .close()
        .await
        .map_err(failed)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await
        .map_err(failed)
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
/// will connect to it: pools to the same host and port add up, and the room is
/// max_connections, less the slots reserved for superusers (unless we are one), less the
/// client connections open right now.
pub async fn check_room(requests: &[PoolRequest<'_>]) -> anyhow::Result<()> {
    let mut servers: Vec<(String, u16, Vec<&PoolRequest<'_>>)> = Vec::new();
    for request in requests {
        let options = parse_url(request.url, request.url_setting)?;
        let (host, port) = (options.get_host().to_string(), options.get_port());
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
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(unreachable)?;
        let (max, reserved, in_use): (i32, i32, i64) = sqlx::query_as(
            "SELECT current_setting('max_connections')::int4,
                    CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                         THEN 0 ELSE current_setting('superuser_reserved_connections')::int4 END,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read max_connections at {host}:{port}: {e}"))?;
        conn.close().await.map_err(unreachable)?;
        // This check's own connection is closed again: it does not count.
        let room = i64::from(max) - i64::from(reserved) - (in_use - 1);
        let wanted: i64 = pools.iter().map(|p| i64::from(p.size)).sum();
        if wanted > room {
            let sizes: Vec<String> = pools
                .iter()
                .map(|p| format!("{}={}", p.size_setting, p.size))
                .collect();
            let settings: Vec<&str> = pools.iter().map(|p| p.size_setting).collect();
            anyhow::bail!(
                "the connection pools need up to {wanted} connections to the PostgreSQL server at \
                 {host}:{port} ({}), but it has room for {} more (max_connections {max}, \
                 {reserved} reserved for superusers, {} in use): lower {} (or \
                 CRM_ANALYTICS_WORKERS), or raise max_connections on the server",
                sizes.join(", "),
                room.max(0),
                in_use - 1,
                settings.join(" or ")
            );
        }
    }
    Ok(())
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
