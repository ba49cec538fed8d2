//! Brokers for tests: a stream and consumer (NATS, removed afterwards), a queue (SQS) or an
//! archive bucket (S3) of a test's own.

use crm_analytics::queue::nats::{NatsOptions, NatsQueue, NatsSpec};
use crm_analytics::queue::QueueOptions;
use std::time::Duration;
use uuid::Uuid;

/// A stream and consumer of this test's own on the test server, or None to skip.
pub struct FreshNats {
    pub url: String,
    pub spec: NatsSpec,
    pub options: QueueOptions,
}

impl FreshNats {
    pub fn new(lease: Duration) -> Option<Self> {
        let url = super::nats_url()?;
        let id = Uuid::new_v4().simple().to_string();
        let spec = NatsSpec::new(&url, &format!("TEST_{id}")).expect("a stream name");
        let options = QueueOptions {
            capacity: u64::MAX,
            lease,
            nats: NatsOptions {
                consumer: format!("workers-{id}"),
                subject: None,
            },
            ..QueueOptions::default()
        };
        Some(Self { url, spec, options })
    }

    pub async fn open(&self) -> NatsQueue {
        NatsQueue::open(&self.spec, &self.options)
            .await
            .expect("open the NATS queue")
    }

    /// A plain JetStream client on the same server, to look behind the queue's back.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url.as_str())
            .await
            .expect("connect to NATS");
        async_nats::jetstream::new(client)
    }
}

impl Drop for FreshNats {
    /// Deletes the stream (and its consumer), also after a failed assertion: on a thread and
    /// runtime of its own, as the test's runtime may be gone or busy panicking.
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.spec.stream.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(url.as_str()).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&stream)
                        .await;
                }
            });
        })
        .join();
    }
}

impl FreshNats {
    /// The settings a `crm-analytics` process needs to use this stream and consumer.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "CRM_ANALYTICS_QUEUE",
                format!("{}/{}", self.url, self.spec.stream),
            ),
            (
                "CRM_ANALYTICS_NATS_CONSUMER",
                self.options.nats.consumer.clone(),
            ),
        ]
    }
}

/// An SQS queue of a test's own on the local SQS-compatible server (created on open).
pub struct FreshSqs {
    pub endpoint: String,
    pub target: crm_analytics::queue::SqsTarget,
    pub options: QueueOptions,
}

impl FreshSqs {
    pub fn new(lease: Duration) -> Option<Self> {
        let endpoint = super::aws_endpoint()?;
        let target = crm_analytics::queue::SqsTarget::Name(format!(
            "crm-analytics-test-{}",
            Uuid::new_v4().simple()
        ));
        let options = QueueOptions {
            lease,
            sqs: crm_analytics::queue::sqs::SqsSettings {
                endpoint: Some(endpoint.clone()),
                region: Some("us-east-1".to_string()),
                credentials: Some(crm_analytics::queue::sqs::StaticCredentials::new(
                    "test", "test",
                )),
            },
            ..QueueOptions::default()
        };
        Some(Self {
            endpoint,
            target,
            options,
        })
    }

    pub async fn open(&self) -> crm_analytics::queue::sqs::SqsQueue {
        crm_analytics::queue::sqs::SqsQueue::open(&self.target, &self.options)
            .await
            .expect("open the SQS queue")
    }

    /// The settings a `crm-analytics` process needs to use this queue.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CRM_ANALYTICS_QUEUE", self.target.to_string()),
            ("CRM_ANALYTICS_SQS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// Settings for the local S3-compatible server (moto), which accepts any credentials. Given
/// through the builder: tests run in parallel threads of one process, so the AWS_* variables
/// are not touched.
pub fn moto(endpoint: &str) -> crm_analytics::archive::S3Options {
    crm_analytics::archive::S3Options {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
    }
}

/// A bucket name of a test's own.
pub fn bucket_name() -> String {
    format!("crm-analytics-{}", Uuid::new_v4().simple())
}

/// Creates `bucket` on the S3-compatible server (moto takes a plain, unsigned PUT).
pub async fn create_bucket(endpoint: &str, bucket: &str) {
    let response = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("reach the S3-compatible server");
    assert!(
        response.status().is_success(),
        "create bucket {bucket}: {}",
        response.status()
    );
}
