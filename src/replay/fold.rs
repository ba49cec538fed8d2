//! Folding the archive into the aggregates: objects are fetched and decoded ahead on other
//! threads (bounded), copies of an event dropped, parked events left out, and the events'
//! deltas summed and written in chunks of keys. Memory holds the listing (one path per
//! object: about a thousand per million events in the batch layout, one per event in the
//! per-event layout), one folder's event ids and one chunk of keys.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path;
use sqlx::PgConnection;
use std::collections::HashSet;
use uuid::Uuid;

use super::progress::Progress;
use super::{DateRange, ReplayError, ReplayReport};
use crate::aggregates::{
    apply::write_deltas,
    delta::Deltas,
    rows::{decode, ChangeEvent},
};
use crate::archive::read::{lines, Listing};
use crate::archive::Archive;
use crate::backfill::Snapshot;
use crate::event::Envelope;

/// Objects fetched and decoded ahead of the one being summed.
const READ_AHEAD: usize = 16;
/// Events whose ledger entries are written in one statement.
const LEDGER_BATCH: usize = 20_000;
/// Aggregate keys summed in memory before they are written.
const CHUNK: usize = 20_000;

/// What the fold does with the events.
pub(super) enum Mode {
    /// Every event counts, metrics and event counts; every id goes into the ledger.
    Replace,
    /// Every event counts toward the metrics, nothing else is written (verify --archive).
    Compare,
    /// Only the rows `range` owns are recomputed. Events missing from the ledger and
    /// captured after `claim_after` (the oldest ledger entry) were not applied yet: they
    /// are counted whole (their rows outside the range too, unless the last backfill's
    /// snapshot saw them, as a worker would) and get their ledger entries.
    Range {
        range: DateRange,
        claim_after: DateTime<Utc>,
        watermark: Option<Snapshot>,
    },
}

/// Archived events still waiting in the outbox with no ledger entry (when the outbox is in
/// this database). The outbox as the queue removes an event in the transaction that
/// applies it, so one still there was archived by an attempt that rolled back and is
/// applied when a worker claims it again: counting it here too would count it twice.
/// (Behind the relay, an event applied while its row stayed in the outbox has a ledger
/// entry and is counted as usual; one without was never applied either.)
async fn waiting_in_outbox(tx: &mut PgConnection) -> Result<HashSet<Uuid>, sqlx::Error> {
    let here: bool =
        sqlx::query_scalar("SELECT to_regclass('crm_analytics.event_outbox') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await?;
    if !here {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT o.event_id FROM crm_analytics.event_outbox o
         WHERE NOT EXISTS (SELECT 1 FROM crm_analytics.applied_events a
                           WHERE a.event_id = o.event_id)",
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Sums the archive's events into the aggregate tables through `tx` (already emptied of
/// what is recomputed).
pub(super) async fn fold(
    tx: &mut PgConnection,
    archive: &Archive,
    listing: &Listing,
    mode: Mode,
) -> Result<ReplayReport, ReplayError> {
    // Parked, or put back on the queue and not applied yet: the archive holds only copies
    // of failed attempts, and what counts is the delivery still to come.
    let parked: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM crm_analytics.failed_events
         UNION SELECT event_id FROM crm_analytics.retried_events",
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let waiting = waiting_in_outbox(tx).await?;
    let mut progress = Progress::start(listing.objects() as u64);
    let (sender, mut objects) = tokio::sync::mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(read_ahead(archive.clone(), listing_paths(listing), sender));

    let mut state = Fold {
        mode,
        owned: Deltas::default(),
        outside: Deltas::default(),
        pending: Vec::new(),
        report: ReplayReport::default(),
    };
    let mut folder = usize::MAX;
    let mut seen: HashSet<Uuid> = HashSet::new();
    let outcome: Result<(), ReplayError> = async {
        while let Some((index, events)) = objects.recv().await {
            let events = events?;
            if index != folder {
                folder = index;
                seen.clear();
            }
            state.report.objects += 1;
            state.report.read += events.len() as u64;
            progress.object(events.len() as u64);
            for event in events {
                if !seen.insert(event.event_id) {
                    state.report.duplicates += 1;
                } else if parked.contains(&event.event_id) {
                    state.report.parked += 1;
                } else if waiting.contains(&event.event_id) {
                    state.report.waiting += 1;
                } else {
                    state.pending.push(event);
                }
            }
            if state.pending.len() >= LEDGER_BATCH {
                state.settle(tx).await?;
            }
        }
        state.settle(tx).await?;
        // A reader that stopped early (it cannot, short of a panic) must not commit half.
        let listed = listing.objects() as u64;
        if state.report.objects != listed {
            return Err(ReplayError::Truncated {
                read: state.report.objects,
                listed,
            });
        }
        state.flush(tx, true).await
    }
    .await;
    reader.abort();
    progress.finish(&state.report);
    outcome.map(|()| state.report)
}

/// Every object, with the index of its folder, in listing order.
fn listing_paths(listing: &Listing) -> Vec<(usize, Path)> {
    listing
        .folders
        .iter()
        .enumerate()
        .flat_map(|(index, folder)| folder.objects.iter().map(move |p| (index, p.clone())))
        .collect()
}

type Decoded = (usize, Result<Vec<ChangeEvent>, ReplayError>);

/// Fetches and decodes objects in order, READ_AHEAD at a time, into `sender`.
async fn read_ahead(
    archive: Archive,
    paths: Vec<(usize, Path)>,
    sender: tokio::sync::mpsc::Sender<Decoded>,
) {
    let (store, _) = archive.store();
    let mut decoded = futures::stream::iter(paths)
        .map(|(index, path)| {
            let store = store.clone();
            async move {
                let events = match Archive::fetch(&store, &path).await {
                    Err(error) => Err(ReplayError::from(error)),
                    Ok(bytes) => tokio::task::spawn_blocking(move || decode_object(&path, &bytes))
                        .await
                        .unwrap_or_else(|e| {
                            Err(ReplayError::Event {
                                path: String::new(),
                                line: 0,
                                reason: format!("decoding stopped: {e}"),
                            })
                        }),
                };
                (index, events)
            }
        })
        .buffered(READ_AHEAD);
    while let Some(item) = decoded.next().await {
        if sender.send(item).await.is_err() {
            return;
        }
    }
}

/// The events of one archived object.
fn decode_object(path: &Path, bytes: &[u8]) -> Result<Vec<ChangeEvent>, ReplayError> {
    let damaged = |line: usize, reason: String| ReplayError::Event {
        path: path.to_string(),
        line,
        reason,
    };
    lines(path, bytes)?
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let envelope = Envelope::from_json(line)
                .map_err(|e| damaged(i + 1, format!("not an event envelope: {e}")))?;
            decode(&envelope).map_err(|e| damaged(i + 1, e))
        })
        .collect()
}

struct Fold {
    mode: Mode,
    /// Contributions to the rows being recomputed.
    owned: Deltas,
    /// Date-range replay: contributions of claimed events to rows outside the range.
    outside: Deltas,
    /// Distinct events waiting for their ledger entries.
    pending: Vec<ChangeEvent>,
    report: ReplayReport,
}

fn keys(deltas: &Deltas) -> usize {
    deltas.daily.len() + deltas.funnel.len() + deltas.revenue.len() + deltas.counts.len()
}

impl Fold {
    /// Writes the pending events' ledger entries and adds their contributions.
    async fn settle(&mut self, tx: &mut PgConnection) -> Result<(), ReplayError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = self.pending.iter().map(|e| e.event_id).collect();
        let fresh: HashSet<Uuid> = match self.mode {
            Mode::Compare => HashSet::new(),
            Mode::Replace => {
                let fresh: i64 = sqlx::query_scalar(
                    "WITH added AS (
                        INSERT INTO crm_analytics.applied_events (event_id)
                        SELECT unnest($1::uuid[]) ON CONFLICT (event_id) DO NOTHING
                        RETURNING 1)
                     SELECT count(*) FROM added",
                )
                .bind(&ids)
                .fetch_one(&mut *tx)
                .await?;
                self.report.fresh += fresh as u64;
                HashSet::new()
            }
            Mode::Range { .. } => sqlx::query_scalar(
                "INSERT INTO crm_analytics.applied_events (event_id)
                 SELECT unnest($1::uuid[]) ON CONFLICT (event_id) DO NOTHING
                 RETURNING event_id",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect(),
        };
        self.report.fresh += fresh.len() as u64;
        for event in self.pending.drain(..) {
            self.report.events += 1;
            self.owned.add_event(&event);
            match &self.mode {
                Mode::Compare => {}
                Mode::Replace => self.owned.count_processed(&event),
                Mode::Range {
                    claim_after,
                    watermark,
                    ..
                } => {
                    if fresh.contains(&event.event_id) && event.created_at >= *claim_after {
                        self.report.claimed += 1;
                        self.outside.count_processed(&event);
                        if !watermark.as_ref().is_some_and(|s| s.sees(event.xid)) {
                            self.outside.add_event(&event);
                        }
                    }
                }
            }
        }
        self.flush(tx, false).await
    }

    /// Writes the summed contributions once they hold CHUNK keys (or `all` of them).
    async fn flush(&mut self, tx: &mut PgConnection, all: bool) -> Result<(), ReplayError> {
        let range = match &self.mode {
            Mode::Range { range, .. } => Some(*range),
            _ => None,
        };
        if all || keys(&self.owned) >= CHUNK {
            let mut owned = std::mem::take(&mut self.owned);
            if let Some(range) = range {
                range.retain(&mut owned, true);
            }
            owned.prune_zeros();
            write_deltas(tx, &owned).await?;
        }
        if all || keys(&self.outside) >= CHUNK {
            let mut outside = std::mem::take(&mut self.outside);
            if let Some(range) = range {
                range.retain(&mut outside, false);
            }
            outside.prune_zeros();
            write_deltas(tx, &outside).await?;
        }
        Ok(())
    }
}
