//! Brokers for tests: a stream and consumer (NATS) of a test's own, removed afterwards.

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
