//! Database connections, with errors that say which setting to fix.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// Connects a pool to `url`; `setting` names the variable the URL came from.
pub async fn connect(url: &str, setting: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).map_err(|e| {
        anyhow::anyhow!("{setting} is not a valid PostgreSQL URL ({e}); expected postgres://user:password@host:5432/database")
    })?;
    let options = plain_on_loopback(url, options);
    let unreachable = |e: sqlx::Error| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {} ({setting}): {e}. Start PostgreSQL or fix {setting}",
            redact(url)
        )
    };
    // One direct attempt first, so that a wrong address fails at once instead of after the
    // pool's acquire timeout.
    PgConnection::connect_with(&options)
        .await
        .map_err(unreachable)?
        .close()
        .await
        .map_err(unreachable)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(unreachable)
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
        let options = PgConnectOptions::from_str(request.url).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid PostgreSQL URL ({e})",
                request.url_setting
            )
        })?;
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
        let options = plain_on_loopback(first.url, PgConnectOptions::from_str(first.url)?);
        let unreachable = |e: sqlx::Error| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at {} ({}): {e}. Start PostgreSQL or fix {}",
                redact(first.url),
                first.url_setting,
                first.url_setting
            )
        };
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

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable URL>".to_string(),
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
