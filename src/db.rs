//! Database connections, with errors that say which setting to fix.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// Connects a pool to `url`; `setting` names the variable the URL came from.
pub async fn connect(url: &str, setting: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).map_err(|e| {
        anyhow::anyhow!("{setting} is not a valid PostgreSQL URL ({e}); expected postgres://user:password@host:5432/database")
    })?;
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
