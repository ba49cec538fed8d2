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
