//! The event envelope: what the relay reads from the outbox, the queue carries and the
//! workers decode. Kept apart from every stage so that all of them speak the same format.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// One captured row change as it travels through the queue (JSON on the wire).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    /// `<table>.<operation>`, for example `leads.update`.
    pub event_type: String,
    pub aggregate_id: Option<Uuid>,
    /// The writing transaction's id (PostgreSQL xid8), for snapshot visibility.
    pub xid: u64,
    /// The writing transaction's start, in UTC.
    pub created_at: DateTime<Utc>,
    /// `{"old": row image|null, "new": row image|null}`, kept verbatim.
    pub payload: Box<RawValue>,
}

impl Envelope {
    pub fn to_json(&self) -> String {
        // Serializing plain data into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The CRM tables the pipeline captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrmTable {
    Accounts,
    Leads,
    Projects,
    Activities,
}

impl CrmTable {
    pub const ALL: [CrmTable; 4] = [
        CrmTable::Accounts,
        CrmTable::Leads,
        CrmTable::Projects,
        CrmTable::Activities,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CrmTable::Accounts => "accounts",
            CrmTable::Leads => "leads",
            CrmTable::Projects => "projects",
            CrmTable::Activities => "activities",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What happened to the row; `Snapshot` is a row read by backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Snapshot,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Snapshot => "snapshot",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Snapshot,
        ]
        .into_iter()
        .find(|o| o.name() == name)
    }
}

/// Splits `leads.update` into its table and operation.
pub fn parse_event_type(event_type: &str) -> Option<(CrmTable, Operation)> {
    let (table, op) = event_type.split_once('.')?;
    Some((CrmTable::from_name(table)?, Operation::from_name(op)?))
}
