//! Reading the archive back: listing its objects by day and table, and turning an object
//! (either layout) into its events' JSON lines. `replay` and `verify --archive` read through
//! this; nothing here interprets an event.

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use flate2::read::MultiGzDecoder;
use futures::TryStreamExt;
use object_store::{path::Path, ObjectStore};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use super::Archive;
use crate::event::CrmTable;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("listing the archive failed: {0}")]
    List(#[source] object_store::Error),
    #[error("reading {path} from the archive failed: {source}")]
    Get {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path} is not a readable gzip JSON Lines object: {reason}")]
    Corrupt { path: String, reason: String },
}

/// One folder of the archive: the objects of one day (the events' UTC date) and table.
/// A retried batch archives its events again in the same folder, since both the date and
/// the table come from the event: de-duplicating within a folder is enough. Objects are
/// listed newest first, so that the copy a reader keeps is the last one written: the one
/// whose batch committed (attempts that failed before it wrote older copies, which may
/// differ from it when an operator corrected a parked event before retrying it).
#[derive(Debug, Clone)]
pub struct Folder {
    pub date: NaiveDate,
    pub table: CrmTable,
    pub objects: Vec<Path>,
    /// Sum of the objects' sizes, in bytes.
    pub bytes: u64,
}

/// What the listing found.
#[derive(Debug, Default)]
pub struct Listing {
    /// In date order, then table order.
    pub folders: Vec<Folder>,
    /// Objects outside the `events/YYYY/MM/DD/<table>/` layout, left alone.
    pub foreign: Vec<String>,
}

impl Listing {
    pub fn objects(&self) -> usize {
        self.folders.iter().map(|f| f.objects.len()).sum()
    }
}

/// An object's path with the time it was written.
type Dated = (DateTime<Utc>, Path);

impl Archive {
    /// Lists every archived object, grouped by folder.
    pub async fn list(&self) -> Result<Listing, ReadError> {
        let (store, prefix) = self.store();
        let root = Path::from(match prefix.as_ref() {
            "" => "events".to_string(),
            prefix => format!("{prefix}/events"),
        });
        let skip = root.parts().count();
        let metas: Vec<object_store::ObjectMeta> = store
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(ReadError::List)?;
        let mut folders: BTreeMap<(NaiveDate, CrmTable), (Folder, Vec<Dated>)> = BTreeMap::new();
        let mut listing = Listing::default();
        for meta in metas {
            let parts: Vec<String> = meta
                .location
                .parts()
                .skip(skip)
                .map(|p| p.as_ref().to_string())
                .collect();
            match folder_of(&parts) {
                Some((date, table)) => {
                    let (folder, dated) = folders.entry((date, table)).or_insert_with(|| {
                        let folder = Folder {
                            date,
                            table,
                            objects: Vec::new(),
                            bytes: 0,
                        };
                        (folder, Vec::new())
                    });
                    folder.bytes += meta.size;
                    dated.push((meta.last_modified, meta.location));
                }
                None => listing.foreign.push(meta.location.to_string()),
            }
        }
        listing.folders = folders
            .into_values()
            .map(|(mut folder, mut dated)| {
                dated.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                folder.objects = dated.into_iter().map(|(_, path)| path).collect();
                folder
            })
            .collect();
        Ok(listing)
    }

    /// Fetches one object's bytes.
    pub async fn fetch(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<Bytes, ReadError> {
        let get = |source| ReadError::Get {
            path: path.to_string(),
            source,
        };
        store
            .get(path)
            .await
            .map_err(get)?
            .bytes()
            .await
            .map_err(get)
    }
}

/// `YYYY/MM/DD/<table>/<name>` (below `events/`) to its date and table.
fn folder_of(parts: &[String]) -> Option<(NaiveDate, CrmTable)> {
    let [year, month, day, table, name] = parts else {
        return None;
    };
    if !(name.ends_with(".json") || name.ends_with(".jsonl.gz")) {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, day.parse().ok()?)?;
    Some((date, CrmTable::from_name(table)?))
}

/// The JSON lines an object holds: a batch object (`.jsonl.gz`) one per event, a per-event
/// object (`.json`) one. CPU work: run it off the async threads.
pub fn lines(path: &Path, bytes: &[u8]) -> Result<Vec<String>, ReadError> {
    let text = if path.as_ref().ends_with(".gz") {
        let mut text = String::new();
        // Every member: concatenated gzip files are one valid gzip file.
        MultiGzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| ReadError::Corrupt {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        text
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|e| ReadError::Corrupt {
            path: path.to_string(),
            reason: e.to_string(),
        })?
    };
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_read_from_the_layout_and_anything_else_is_foreign() {
        let parts = |p: &str| p.split('/').map(str::to_string).collect::<Vec<_>>();
        let date = NaiveDate::from_ymd_opt(2026, 3, 9).expect("date");
        assert_eq!(
            folder_of(&parts("2026/03/09/leads/x.jsonl.gz")),
            Some((date, CrmTable::Leads))
        );
        assert_eq!(folder_of(&parts("2026/13/09/leads/x.json")), None);
        assert_eq!(folder_of(&parts("2026/03/09/deals/x.json")), None);
        assert_eq!(folder_of(&parts("2026/03/09/leads")), None);
        assert_eq!(folder_of(&parts("2026/03/09/leads/notes.txt")), None);
    }

    #[test]
    fn both_layouts_give_their_lines() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(b"{\"a\":1}\n{\"a\":2}\n").expect("gzip");
        let batch = gz.finish().expect("gzip");
        let got = lines(&Path::from("e/b.jsonl.gz"), &batch).expect("batch object");
        assert_eq!(got, vec!["{\"a\":1}", "{\"a\":2}"]);
        let got = lines(&Path::from("e/id.json"), b"{\"a\":3}").expect("event object");
        assert_eq!(got, vec!["{\"a\":3}"]);
        assert!(lines(&Path::from("e/b.jsonl.gz"), b"not gzip").is_err());
    }
}
