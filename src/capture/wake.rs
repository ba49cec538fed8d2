//! When the outbox's consumer looks again: the `relay_asleep` flag the capture's statement
//! trigger reads before it notifies, and the pace that goes with it.
//!
//! Whoever drains the outbox (the relay, or the workers when the outbox is the queue) stays
//! awake while events flow and polls every [`AWAKE_POLL`], so that writers need not notify:
//! a NOTIFY costs every CRM transaction more than this poll costs us. After [`LINGER`]
//! without events it raises the flag, polls until the transactions that may have read the
//! flag down have ended, and then sleeps until a notification or the safety-net poll.

use sqlx::PgPool;
use std::time::{Duration, Instant};

/// While events keep coming the consumer polls this often.
pub const AWAKE_POLL: Duration = Duration::from_millis(5);
/// After this long without events the consumer goes to sleep and lets writers wake it.
pub const LINGER: Duration = Duration::from_secs(1);

/// The flag, as one consumer last wrote it.
struct SleepFlag {
    crm: PgPool,
    /// What this consumer last wrote (None: nothing yet).
    asleep: Option<bool>,
    /// Transactions that were running when the flag went up: they may have read it down
    /// and will commit without a notification, so the consumer keeps polling until they end.
    in_flight: Option<(String, Instant)>,
}

impl SleepFlag {
    async fn set(&mut self, asleep: bool) -> Result<(), sqlx::Error> {
        if self.asleep == Some(asleep) {
            return Ok(());
        }
        sqlx::query("SELECT setval('crm_analytics.relay_asleep', $1, true)")
            .bind(i64::from(asleep))
            .execute(&self.crm)
            .await?;
        self.asleep = Some(asleep);
        self.in_flight = None;
        if asleep {
            // A statement of its own, after the flag is up: setval took a transaction id.
            let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
                .fetch_one(&self.crm)
                .await?;
            self.in_flight = Some((snapshot, Instant::now()));
        }
        Ok(())
    }

    /// Whether writers that may not have seen the flag up can still commit.
    async fn writers_in_flight(&mut self, patience: Duration) -> Result<bool, sqlx::Error> {
        let Some((snapshot, since)) = &self.in_flight else {
            return Ok(false);
        };
        // Past the patience, the ordinary poll picks up whatever they commit.
        let running = since.elapsed() < patience
            && sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_snapshot_xip($1::pg_snapshot) x
                                WHERE pg_xact_status(x) = 'in progress')",
            )
            .bind(snapshot)
            .fetch_one(&self.crm)
            .await?;
        if !running {
            self.in_flight = None;
        }
        Ok(running)
    }
}

/// How long one consumer of the outbox waits before it claims again.
pub struct Pacer {
    flag: SleepFlag,
    last_event: Instant,
}

impl Pacer {
    /// A consumer of the outbox in the CRM database `crm`.
    pub fn new(crm: PgPool) -> Self {
        Self {
            flag: SleepFlag {
                crm,
                asleep: None,
                in_flight: None,
            },
            last_event: Instant::now(),
        }
    }

    /// After a claim found `claimed` events where it asked for `limit`: how long to wait
    /// (for a notification, or at most this long) before claiming again. Zero: at once.
    pub async fn after_claim(
        &mut self,
        claimed: usize,
        limit: usize,
        poll_interval: Duration,
    ) -> Result<Duration, sqlx::Error> {
        if claimed > 0 {
            self.last_event = Instant::now();
            self.flag.set(false).await?;
        }
        if claimed >= limit {
            return Ok(Duration::ZERO);
        }
        if self.last_event.elapsed() < LINGER {
            return Ok(AWAKE_POLL);
        }
        if self.flag.asleep != Some(true) {
            self.flag.set(true).await?;
            return Ok(Duration::ZERO); // look once more with the flag up
        }
        if self.flag.writers_in_flight(poll_interval).await? {
            return Ok(AWAKE_POLL);
        }
        Ok(poll_interval)
    }
}
