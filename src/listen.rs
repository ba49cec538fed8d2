//! Wake-ups from PostgreSQL LISTEN/NOTIFY, with polling as the safety net.
//!
//! A [`ChannelWatcher`] keeps one listening connection per channel and process and counts
//! notifications in an epoch. A waiter remembers the epoch it last saw before looking for
//! work, so a notification that lands between "found nothing" and "start waiting" is not lost.

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
pub struct ChannelWatcher {
    epoch: watch::Receiver<u64>,
}

impl ChannelWatcher {
    /// Starts listening on `channel` in a background task that lives as long as the process.
    pub async fn start(pool: &PgPool, channel: &'static str) -> Result<Self, sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        let (tx, rx) = watch::channel(0u64);
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let result = listener.recv().await;
                if pool.is_closed() {
                    return; // the process is shutting its connections down
                }
                // On an error the listener reconnects on the next recv; notifications sent
                // meanwhile are lost, so wake everybody up to poll once.
                if let Err(error) = &result {
                    tracing::warn!(channel, %error, "notification listener lost its connection; polling");
                }
                if tx.is_closed() {
                    return; // nobody watches any more
                }
                tx.send_modify(|epoch| *epoch = epoch.wrapping_add(1));
                if result.is_err() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(Self { epoch: rx })
    }

    /// The current epoch: read it before looking for work.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Returns once a notification newer than `seen` arrived, or after `timeout`.
    pub async fn wait(&self, seen: u64, timeout: Duration) {
        let mut rx = self.epoch.clone();
        if *rx.borrow_and_update() != seen {
            return;
        }
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }
}
