//! Row images: the few columns of each CRM row that the metrics depend on, decoded and
//! validated from an event payload before anything is written, so that a malformed event
//! fails alone and early.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{de, Deserialize, Deserializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::{parse_event_type, CrmTable, Envelope, Operation};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeadStatus {
    New,
    Contacted,
    Qualified,
    Converted,
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    Open,
    Won,
    Lost,
}

// A CRM may leave any column NULL that its own schema allows; a NULL grouping column is
// counted under a NULL key (see `delta`), a NULL status in no status column. Every column
// must still be present in the image (`nullable` and `exact_decimal` do not default a
// missing field), so an image that lost a column fails instead of counting as NULL.
#[derive(Debug, Clone, Deserialize)]
pub struct LeadRow {
    #[serde(deserialize_with = "nullable")]
    pub account_id: Option<Uuid>,
    #[serde(deserialize_with = "nullable")]
    pub source: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub status: Option<LeadStatus>,
    #[serde(deserialize_with = "nullable")]
    pub converted_at: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "nullable")]
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProjectRow {
    #[serde(deserialize_with = "nullable")]
    pub account_id: Option<Uuid>,
    #[serde(deserialize_with = "nullable")]
    pub status: Option<ProjectStatus>,
    /// A NULL amount of a won deal counts as a deal won with revenue 0 (see `delta`).
    #[serde(deserialize_with = "exact_decimal")]
    pub amount: Option<Decimal>,
    #[serde(deserialize_with = "nullable")]
    pub closed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ActivityRow {
    #[serde(deserialize_with = "nullable")]
    pub account_id: Option<Uuid>,
    #[serde(deserialize_with = "nullable")]
    pub occurred_at: Option<DateTime<Utc>>,
}

/// A decoded row image of one of the captured tables.
#[derive(Debug, Clone)]
pub enum RowImage {
    Account,
    Lead(LeadRow),
    Project(ProjectRow),
    Activity(ActivityRow),
}

/// An event ready to be applied: everything a handler needs, already validated.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub event_id: Uuid,
    pub table: CrmTable,
    pub operation: Operation,
    pub xid: u64,
    pub created_at: DateTime<Utc>,
    pub old: Option<RowImage>,
    pub new: Option<RowImage>,
}

impl ChangeEvent {
    pub fn date(&self) -> NaiveDate {
        self.created_at.date_naive()
    }
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    old: Option<&'a RawValue>,
    #[serde(borrow, default)]
    new: Option<&'a RawValue>,
}

/// Decodes an envelope into a [`ChangeEvent`], or says what is wrong with it.
pub fn decode(envelope: &Envelope) -> Result<ChangeEvent, String> {
    let (table, operation) = parse_event_type(&envelope.event_type)
        .ok_or_else(|| format!("unknown event type {:?}", envelope.event_type))?;
    let payload: Payload = serde_json::from_str(envelope.payload.get())
        .map_err(|e| format!("payload is not a JSON object with old/new: {e}"))?;
    let image = |raw: Option<&RawValue>, side: &str| -> Result<Option<RowImage>, String> {
        match raw {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => decode_row(table, raw.get())
                .map(Some)
                .map_err(|e| format!("{side} row image of {}: {e}", table.name())),
        }
    };
    let old = image(payload.old, "old")?;
    let new = image(payload.new, "new")?;
    let expected = match operation {
        Operation::Insert | Operation::Snapshot => (false, true),
        Operation::Update => (true, true),
        Operation::Delete => (true, false),
    };
    if (old.is_some(), new.is_some()) != expected {
        return Err(format!(
            "a {} event needs {} row image(s)",
            operation.name(),
            match expected {
                (true, true) => "old and new",
                (true, false) => "an old",
                _ => "a new",
            }
        ));
    }
    Ok(ChangeEvent {
        event_id: envelope.event_id,
        table,
        operation,
        xid: envelope.xid,
        created_at: envelope.created_at,
        old,
        new,
    })
}

fn decode_row(table: CrmTable, json: &str) -> Result<RowImage, String> {
    // The error names the column that is wrong, e.g. "created_at: input contains ...".
    fn parse<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, String> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| e.to_string())
    }
    Ok(match table {
        CrmTable::Accounts => RowImage::Account,
        CrmTable::Leads => RowImage::Lead(parse(json)?),
        CrmTable::Projects => RowImage::Project(parse(json)?),
        CrmTable::Activities => RowImage::Activity(parse(json)?),
    })
}

/// A column that may be NULL but not absent: unlike a plain `Option` field, a missing key
/// is an error, so a payload that lost a column fails instead of counting as NULL.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    Option::deserialize(deserializer)
}

/// Reads a JSON number (kept verbatim by serde_json's arbitrary precision) or a string as
/// an exact decimal: money never passes through floating point. NULL is `None`; like
/// [`nullable`], a missing key is an error.
fn exact_decimal<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Decimal>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Number(serde_json::Number),
        String(String),
    }
    let text = match Option::<Text>::deserialize(deserializer)? {
        None => return Ok(None),
        Some(Text::Number(n)) => n.to_string(),
        Some(Text::String(s)) => s,
    };
    Decimal::from_str_exact(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map(Some)
        .map_err(|e| de::Error::custom(format!("amount {text:?} is not an exact decimal: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(event_type: &str, payload: &str) -> Envelope {
        Envelope {
            event_id: Uuid::nil(),
            event_type: event_type.into(),
            aggregate_id: None,
            xid: 1,
            created_at: Utc::now(),
            payload: RawValue::from_string(payload.into()).unwrap(),
        }
    }

    #[test]
    fn money_stays_exact_beyond_floating_point() {
        let event = decode(&envelope(
            "projects.insert",
            r#"{"new": {"account_id": null, "status": "won", "amount": 123456789012.35, "closed_at": null}}"#,
        ))
        .unwrap();
        let Some(RowImage::Project(p)) = event.new else {
            panic!("a project")
        };
        assert_eq!(
            p.amount.map(|a| a.to_string()).as_deref(),
            Some("123456789012.35")
        );
    }

    #[test]
    fn malformed_events_say_what_is_wrong() {
        let error = decode(&envelope("leads.upsert", "{}")).unwrap_err();
        assert!(error.contains("unknown event type"), "{error}");
        let error = decode(&envelope("leads.update", r#"{"new": null}"#)).unwrap_err();
        assert!(error.contains("old and new"), "{error}");
        let error = decode(&envelope(
            "leads.insert",
            r#"{"new": {"account_id": null, "source": "web", "status": "won", "created_at": "2026-01-01T00:00:00+00:00"}}"#,
        ))
        .unwrap_err();
        assert!(error.contains("status"), "{error}");
        let error = decode(&envelope(
            "leads.insert",
            r#"{"new": {"account_id": null, "status": "new", "created_at": null}}"#,
        ))
        .unwrap_err();
        assert!(
            error.contains("source"),
            "a missing column is not a NULL: {error}"
        );
    }

    #[test]
    fn every_metric_column_is_required_even_when_null_is_allowed() {
        let images = [
            (
                "leads",
                &[
                    "account_id",
                    "source",
                    "status",
                    "converted_at",
                    "created_at",
                ][..],
            ),
            ("projects", &["account_id", "status", "amount", "closed_at"]),
            ("activities", &["account_id", "occurred_at"]),
        ];
        for (table, columns) in images {
            let all_null: serde_json::Map<String, serde_json::Value> = columns
                .iter()
                .map(|c| (c.to_string(), serde_json::Value::Null))
                .collect();
            let payload = serde_json::json!({ "new": all_null }).to_string();
            assert!(
                decode(&envelope(&format!("{table}.insert"), &payload)).is_ok(),
                "{table}: every column NULL is a valid image"
            );
            for missing in columns {
                let mut image = all_null.clone();
                image.remove(*missing);
                let payload = serde_json::json!({ "new": image }).to_string();
                let error = decode(&envelope(&format!("{table}.insert"), &payload))
                    .expect_err(&format!("{table} without {missing} is refused"));
                assert!(
                    error.contains(missing),
                    "{table}: a missing {missing} is not a NULL: {error}"
                );
            }
        }
    }

    #[test]
    fn null_columns_decode_as_none() {
        let event = decode(&envelope(
            "leads.insert",
            r#"{"new": {"account_id": null, "source": null, "status": null, "converted_at": null, "created_at": null}}"#,
        ))
        .unwrap();
        let Some(RowImage::Lead(lead)) = event.new else {
            panic!("a lead")
        };
        assert!(lead.source.is_none() && lead.status.is_none() && lead.created_at.is_none());
    }
}
