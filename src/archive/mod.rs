//! Archive: every applied event's raw JSON, kept in an object store.
//!
//! Owns the archive location (a local folder by default, `s3://bucket/prefix` at scale,
//! through the `object_store` crate; see [`s3`] for S3 and S3-compatible servers), the
//! check at start that it can be used, and its layout under `events/YYYY/MM/DD/<table>/`:
//! by default one gzip-compressed JSON Lines object per batch, table and day; optionally one
//! `<event_id>.json` object per event. A retried batch may archive an event twice; readers
//! de-duplicate by event_id.

pub mod read;
mod s3;

pub use s3::{parse_endpoint, S3Options};

use chrono::NaiveDate;
use flate2::{write::GzEncoder, Compression};
use futures::{StreamExt, TryStreamExt};
use object_store::{local::LocalFileSystem, path::Path, ObjectStore, PutPayload};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use uuid::Uuid;

use crate::event::CrmTable;

/// Objects of one batch written at once.
const PUTS_IN_FLIGHT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("CRM_ANALYTICS_ARCHIVE={location:?} cannot be used: {reason}. Give a folder path, a file:// URL or an s3://bucket/prefix URL")]
    Location { location: String, reason: String },
    #[error("{setting} cannot be used: {reason}")]
    Endpoint {
        setting: &'static str,
        reason: String,
    },
    #[error("the archive's bucket {bucket:?} (CRM_ANALYTICS_ARCHIVE={location}) does not exist on {server}: create it, or point CRM_ANALYTICS_ARCHIVE at an existing bucket (and CRM_ANALYTICS_S3_ENDPOINT at the server that holds it)")]
    MissingBucket {
        location: String,
        bucket: String,
        server: String,
    },
    #[error("the archive CRM_ANALYTICS_ARCHIVE={location} cannot be reached on {server}: {reason}. Check that the server is up and that CRM_ANALYTICS_S3_ENDPOINT names it (unset for AWS S3), and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and region (AWS_REGION)")]
    Unavailable {
        location: String,
        server: String,
        reason: String,
    },
    #[error("writing {path} to the archive failed: {source}")]
    Write {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

/// How events are grouped into objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// One gzip JSON Lines object per batch, table and day.
    Batch,
    /// One `<event_id>.json` object per event.
    Event,
}

/// One event to archive: its date, table and raw JSON (one line, the queue envelope).
pub struct ArchivedEvent<'a> {
    pub event_id: Uuid,
    pub date: NaiveDate,
    pub table: CrmTable,
    pub json: &'a str,
}

#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    layout: Layout,
    /// The bucket, when the archive is on S3 (for the check at start).
    s3: Option<Arc<s3::S3Bucket>>,
}

impl Archive {
    /// Opens `location`: a plain folder path, `file:///abs/path`, or `s3://bucket/prefix`
    /// (credentials, region and endpoint from the usual AWS_* variables).
    pub fn open(location: &str, layout: Layout) -> Result<Self, ArchiveError> {
        Self::open_with(location, layout, &S3Options::default())
    }

    /// [`Archive::open`] with S3 settings that override the AWS_* variables (the endpoint
    /// from CRM_ANALYTICS_S3_ENDPOINT; credentials where the environment must not be used).
    /// No request is made: [`Archive::check`] does that.
    pub fn open_with(
        location: &str,
        layout: Layout,
        options: &S3Options,
    ) -> Result<Self, ArchiveError> {
        let fail = |reason: String| ArchiveError::Location {
            location: location.to_string(),
            reason,
        };
        let (store, prefix, bucket): (Arc<dyn ObjectStore>, Path, _) =
            if let Some(rest) = location.strip_prefix("s3://") {
                let bucket = s3::S3Bucket::open(location, rest, options)?;
                let prefix = rest.split_once('/').map(|(_, p)| p).unwrap_or_default();
                let store = Arc::new(bucket.store.clone());
                (store, Path::from(prefix), Some(Arc::new(bucket)))
            } else {
                let folder = match location.strip_prefix("file://") {
                    Some(path) => path,
                    None if location.contains("://") => {
                        return Err(fail("only file:// and s3:// URLs are supported".into()))
                    }
                    None => location,
                };
                std::fs::create_dir_all(folder).map_err(|e| fail(e.to_string()))?;
                let store =
                    LocalFileSystem::new_with_prefix(folder).map_err(|e| fail(e.to_string()))?;
                (Arc::new(store), Path::default(), None)
            };
        Ok(Self {
            store,
            prefix,
            layout,
            s3: bucket,
        })
    }

    /// Checks at start that the archive can be used: on S3, that the endpoint answers, the
    /// bucket exists and the credentials are accepted (a local folder was created by open).
    pub async fn check(&self) -> Result<(), ArchiveError> {
        match &self.s3 {
            Some(bucket) => bucket.check(self.prefix.as_ref()).await,
            None => Ok(()),
        }
    }

    /// The store and prefix the archive writes under (readers and tests list it).
    pub fn store(&self) -> (Arc<dyn ObjectStore>, Path) {
        (self.store.clone(), self.prefix.clone())
    }

    fn folder(&self, date: NaiveDate, table: CrmTable) -> String {
        let base = date.format("events/%Y/%m/%d").to_string();
        match self.prefix.as_ref() {
            "" => format!("{base}/{}", table.name()),
            prefix => format!("{prefix}/{base}/{}", table.name()),
        }
    }

    /// Writes `events`; returns the number of objects written.
    pub async fn write(&self, events: &[ArchivedEvent<'_>]) -> Result<usize, ArchiveError> {
        let mut objects: Vec<(Path, Vec<u8>)> = Vec::new();
        match self.layout {
            Layout::Event => {
                for event in events {
                    let path = format!(
                        "{}/{}.json",
                        self.folder(event.date, event.table),
                        event.event_id
                    );
                    objects.push((Path::from(path), event.json.as_bytes().to_vec()));
                }
            }
            Layout::Batch => {
                let mut groups: BTreeMap<(NaiveDate, CrmTable), Vec<&str>> = BTreeMap::new();
                for event in events {
                    groups
                        .entry((event.date, event.table))
                        .or_default()
                        .push(event.json);
                }
                let batch = Uuid::new_v4();
                for ((date, table), lines) in groups {
                    // The lines are joined first and compressed in one call: the encoder
                    // zero-fills its 32 KiB output buffer on every write, which per line
                    // cost more than the compression itself.
                    let mut text = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
                    for line in lines {
                        text.extend_from_slice(line.as_bytes());
                        text.push(b'\n');
                    }
                    let mut gz =
                        GzEncoder::new(Vec::with_capacity(text.len() / 4), Compression::fast());
                    // Writing into a Vec cannot fail.
                    let _ = gz.write_all(&text);
                    let bytes = gz.finish().unwrap_or_default();
                    let path = format!("{}/{batch}.jsonl.gz", self.folder(date, table));
                    objects.push((Path::from(path), bytes));
                }
            }
        }
        let count = objects.len();
        // Bounded: the per-event layout makes one object per event, and a batch of
        // thousands of simultaneous PUTs would only get an object store to throttle.
        futures::stream::iter(objects.into_iter().map(|(path, bytes)| {
            let store = self.store.clone();
            async move {
                store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|source| ArchiveError::Write {
                        path: path.to_string(),
                        source,
                    })
            }
        }))
        .buffer_unordered(PUTS_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(count)
    }
}
