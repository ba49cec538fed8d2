//! Aggregates: the exact, pre-aggregated metrics in schema `analytics`.
//!
//! Owns the analytics schema and its migrations, the decoding of row images, the pure
//! delta arithmetic (new row minus old row), the set-based writes, the full SQL
//! recomputation that backfill and rebuild load, and the verification against it.

pub mod apply;
pub mod delta;
pub mod recompute;
pub mod rows;
pub mod verify;

use crate::migrate::Migration;

/// The analytics component as its migrations leave it, idempotent: what `migrate` runs
/// to recreate objects that went missing after the migrations ran.
pub const CURRENT_SHAPE: &str = include_str!("sql/current.sql");

/// Migrations of the analytics database (component "analytics").
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "aggregate tables and pipeline bookkeeping",
        sql: include_str!("sql/001_analytics.sql"),
    },
    Migration {
        version: 2,
        description: "read-only role analytics_reader for BI tools",
        sql: include_str!("sql/002_reader_role.sql"),
    },
    Migration {
        version: 3,
        description: "notifications of aggregate changes, for the API's response cache",
        sql: include_str!("sql/003_change_notifications.sql"),
    },
    Migration {
        version: 4,
        description: "NULL keys: rows whose grouping column is NULL count under a NULL key",
        sql: include_str!("sql/004_null_keys.sql"),
    },
    Migration {
        version: 5,
        description: "retried parked events remembered until applied, for replay",
        sql: include_str!("sql/005_retried_events.sql"),
    },
];
