//! Archive layouts on a real local folder through object_store.

use chrono::NaiveDate;
use crm_analytics::archive::{Archive, ArchivedEvent, Layout};
use crm_analytics::event::CrmTable;
use std::io::Read;
use uuid::Uuid;

fn folder() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("crm-analytics-archive-{}", Uuid::new_v4().simple()))
}

#[tokio::test]
async fn event_layout_writes_one_json_object_per_event() {
    let root = folder();
    let archive = Archive::open(&format!("file://{}", root.display()), Layout::Event).unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let date = NaiveDate::from_ymd_opt(2025, 12, 22).unwrap();
    let written = archive
        .write(&[
            ArchivedEvent {
                event_id: a,
                date,
                table: CrmTable::Leads,
                json: r#"{"n":1}"#,
            },
            ArchivedEvent {
                event_id: b,
                date,
                table: CrmTable::Projects,
                json: r#"{"n":2}"#,
            },
        ])
        .await
        .unwrap();
    assert_eq!(written, 2);
    let text =
        std::fs::read_to_string(root.join(format!("events/2025/12/22/leads/{a}.json"))).unwrap();
    assert_eq!(text, r#"{"n":1}"#);
    assert!(root
        .join(format!("events/2025/12/22/projects/{b}.json"))
        .exists());
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn batch_layout_writes_one_gzip_jsonl_object_per_table_and_day() {
    let root = folder();
    let archive = Archive::open(root.to_str().unwrap(), Layout::Batch).unwrap();
    let day = |d| NaiveDate::from_ymd_opt(2026, 1, d).unwrap();
    let event = |date, table, json| ArchivedEvent {
        event_id: Uuid::new_v4(),
        date,
        table,
        json,
    };
    let written = archive
        .write(&[
            event(day(1), CrmTable::Leads, "a"),
            event(day(1), CrmTable::Leads, "b"),
            event(day(2), CrmTable::Leads, "c"),
            event(day(1), CrmTable::Activities, "d"),
        ])
        .await
        .unwrap();
    assert_eq!(written, 3);
    let folder = root.join("events/2026/01/01/leads");
    let files: Vec<_> = std::fs::read_dir(&folder).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(files[0].path()).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "a\nb\n");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn an_unsupported_location_names_the_setting() {
    let error = Archive::open("ftp://example/archive", Layout::Batch)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("CRM_ANALYTICS_ARCHIVE") && error.contains("s3://"),
        "{error}"
    );
}
