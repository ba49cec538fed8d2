//! Property: the delta arithmetic telescopes and commutes. For any history of row versions,
//! the events' deltas summed in any order and any batching equal the metrics of the rows
//! that remain.

use chrono::{DateTime, TimeZone, Utc};
use crm_analytics::aggregates::delta::Deltas;
use crm_analytics::aggregates::rows::{
    ActivityRow, ChangeEvent, LeadRow, LeadStatus, ProjectRow, ProjectStatus, RowImage,
};
use crm_analytics::event::{CrmTable, Operation};
use proptest::prelude::*;
use rust_decimal::Decimal;
use uuid::Uuid;

fn account() -> impl Strategy<Value = Option<Uuid>> {
    prop::option::of((0u128..3).prop_map(Uuid::from_u128))
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..90 * 86_400).prop_map(|s| Utc.timestamp_opt(1_767_225_600 + s, 0).unwrap())
}

fn row(table: u8) -> BoxedStrategy<RowImage> {
    match table {
        // Every column a metric groups by may be NULL (None), and so may a status.
        0 => (
            account(),
            prop::option::of(0usize..3),
            prop::option::of(0usize..5),
            prop::option::of(instant()),
            prop::option::of(instant()),
        )
            .prop_map(|(account_id, source, status, converted_at, created_at)| {
                RowImage::Lead(LeadRow {
                    account_id,
                    source: source.map(|s| ["web", "event", "referral"][s].into()),
                    status: status.map(|s| {
                        [
                            LeadStatus::New,
                            LeadStatus::Contacted,
                            LeadStatus::Qualified,
                            LeadStatus::Converted,
                            LeadStatus::Lost,
                        ][s]
                    }),
                    converted_at,
                    created_at,
                })
            })
            .boxed(),
        1 => (
            account(),
            prop::option::of(0usize..3),
            prop::option::of(-10_000i64..10_000_000),
            prop::option::of(instant()),
        )
            .prop_map(|(account_id, status, cents, closed_at)| {
                RowImage::Project(ProjectRow {
                    account_id,
                    status: status
                        .map(|s| [ProjectStatus::Open, ProjectStatus::Won, ProjectStatus::Lost][s]),
                    amount: cents.map(|c| Decimal::new(c, 2)),
                    closed_at,
                })
            })
            .boxed(),
        _ => (account(), prop::option::of(instant()))
            .prop_map(|(account_id, occurred_at)| {
                RowImage::Activity(ActivityRow {
                    account_id,
                    occurred_at,
                })
            })
            .boxed(),
    }
}

/// A row's life: its versions in order, and whether it is deleted at the end.
fn history() -> impl Strategy<Value = (u8, Vec<RowImage>, bool)> {
    (0u8..3).prop_flat_map(|table| {
        (
            Just(table),
            prop::collection::vec(row(table), 1..5),
            any::<bool>(),
        )
    })
}

fn events(histories: &[(u8, Vec<RowImage>, bool)]) -> (Vec<ChangeEvent>, Vec<RowImage>) {
    let mut events = Vec::new();
    let mut remaining = Vec::new();
    for (table, versions, deleted) in histories {
        let table = [CrmTable::Leads, CrmTable::Projects, CrmTable::Activities][*table as usize];
        let event = |operation, old: Option<&RowImage>, new: Option<&RowImage>| ChangeEvent {
            event_id: Uuid::new_v4(),
            table,
            operation,
            xid: 1,
            created_at: Utc::now(),
            old: old.cloned(),
            new: new.cloned(),
        };
        events.push(event(Operation::Insert, None, Some(&versions[0])));
        for pair in versions.windows(2) {
            events.push(event(Operation::Update, Some(&pair[0]), Some(&pair[1])));
        }
        let last = versions.last().expect("at least one version");
        if *deleted {
            events.push(event(Operation::Delete, Some(last), None));
        } else {
            remaining.push(last.clone());
        }
    }
    (events, remaining)
}

proptest! {
    #[test]
    fn deltas_in_any_order_and_batching_equal_the_final_rows(
        histories in prop::collection::vec(history(), 1..25),
        seed in any::<u64>(),
        batch in 1usize..7,
    ) {
        let (mut events, remaining) = events(&histories);
        let mut expected = Deltas::default();
        for row in &remaining {
            expected.add_row(row, 1);
        }
        expected.prune_zeros();

        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..events.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            events.swap(i, (state % (i as u64 + 1)) as usize);
        }
        // Batches summed separately, then added up, as separate transactions would.
        let mut total = Deltas::default();
        for chunk in events.chunks(batch) {
            let mut part = Deltas::default();
            for event in chunk {
                part.add_event(event);
            }
            total.merge(part);
        }
        total.prune_zeros();
        prop_assert_eq!(total, expected);
    }
}
