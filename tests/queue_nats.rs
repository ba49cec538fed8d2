//! The NATS JetStream queue against a real nats-server: publishing with headers and
//! de-duplication, long-poll latency, delayed retries, leases kept alive and given back, the
//! depth, and the whole pipeline over NATS. Each test has its own stream and consumer.

mod common;

use common::TestDb;
use crm_analytics::queue::nats::{NatsQueue, NatsSpec, EVENT_TYPE_HEADER};
use crm_analytics::queue::{Message, Queue, QueueError, QueueOptions, QueueSpec, Settlement};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use common::brokers::FreshNats as Fresh;

fn message(event_type: &str, body: &str) -> Message {
    Message {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_string(),
        body: body.to_string(),
    }
}

async fn depth(queue: &dyn Queue) -> u64 {
    let depth = queue.depth().await.expect("depth");
    assert!(!depth.approximate, "JetStream counts exactly");
    depth.events
}

#[tokio::test]
async fn messages_round_trip_with_their_headers_and_wake_a_waiting_receiver_at_once() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let queue = Arc::new(fresh.open().await);
    let sent = vec![
        message("leads.insert", r#"{"n":1}"#),
        message("projects.update", r#"{"n":2}"#),
        message("accounts.delete", "not json at all: bodies are opaque"),
    ];
    queue.publish_messages(&sent).await.expect("publish");

    // On the server: the event id as Nats-Msg-Id and the event type as a header.
    let stream = fresh
        .jetstream()
        .await
        .get_stream(&fresh.spec.stream)
        .await
        .expect("the stream exists");
    let stored = stream.get_raw_message(1).await.expect("first message");
    assert_eq!(stored.subject.as_str(), queue.subject());
    let headers = &stored.headers;
    assert_eq!(
        headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str()),
        Some(sent[0].event_id.to_string().as_str())
    );
    assert_eq!(
        headers.get(EVENT_TYPE_HEADER).map(|v| v.as_str()),
        Some("leads.insert")
    );

    let batch = queue
        .receive(10, Duration::from_secs(2))
        .await
        .expect("receive");
    let got: Vec<_> = batch
        .deliveries()
        .iter()
        .map(|d| (d.event_id, d.body.clone(), d.attempt))
        .collect();
    let want: Vec<_> = sent
        .iter()
        .map(|m| (Some(m.event_id), m.body.clone(), 1))
        .collect();
    assert_eq!(got, want, "in order, with ids, bodies and first attempts");
    batch
        .settle(Settlement {
            done: vec![0, 1, 2],
            retry: vec![],
        })
        .await
        .expect("ack");
    assert_eq!(
        depth(&*queue).await,
        0,
        "acknowledged messages leave the stream"
    );

    // Latency: a receiver already waiting wakes as soon as a message is published, and
    // returns it without waiting out the poll.
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let receiver = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let batch = queue
                    .receive(100, Duration::from_secs(5))
                    .await
                    .expect("receive");
                let got = Instant::now();
                let n = batch.deliveries().len();
                batch
                    .settle(Settlement {
                        done: (0..n).collect(),
                        retry: vec![],
                    })
                    .await
                    .expect("ack");
                (got, n)
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await; // the pull request is waiting
        let published = Instant::now();
        queue
            .publish_messages(&[message("leads.insert", "{}")])
            .await
            .expect("publish");
        let (got, n) = receiver.await.expect("receiver");
        assert_eq!(n, 1);
        latencies.push(got.saturating_duration_since(published));
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    eprintln!("publish → receive latency over 20 runs: median {median:?}, max {max:?}");
    assert!(
        max < Duration::from_secs(1),
        "a receive returns as soon as a message is there, not after its wait: {latencies:?}"
    );
    assert!(median < Duration::from_millis(100), "{latencies:?}");
}

#[tokio::test]
async fn an_event_published_twice_within_the_window_is_stored_once() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let queue = fresh.open().await;
    let once = message("leads.insert", "{}");
    let other = message("leads.insert", "{}");
    queue
        .publish_messages(std::slice::from_ref(&once))
        .await
        .expect("publish");
    // A relay that retries a batch re-publishes the same event ids.
    queue
        .publish_messages(&[once.clone(), other.clone(), once.clone()])
        .await
        .expect("re-publish");
    assert_eq!(depth(&queue).await, 2);
    let batch = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    let ids: Vec<_> = batch.deliveries().iter().map(|d| d.event_id).collect();
    assert_eq!(ids, vec![Some(once.event_id), Some(other.event_id)]);
    batch
        .settle(Settlement {
            done: vec![0, 1],
            retry: vec![],
        })
        .await
        .expect("ack");
}

#[tokio::test]
async fn a_retried_message_waits_out_its_delay_and_comes_back_as_attempt_two() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let queue = fresh.open().await;
    let sent = [message("leads.insert", "{}"), message("leads.update", "{}")];
    queue.publish_messages(&sent).await.expect("publish");
    let batch = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(batch.deliveries().len(), 2);
    let delay = Duration::from_millis(1500);
    let settled = Instant::now();
    batch
        .settle(Settlement {
            done: vec![0],
            retry: vec![(1, delay, "failed".into())],
        })
        .await
        .expect("settle");
    assert_eq!(depth(&queue).await, 1, "the retried event is still queued");

    let early = queue
        .receive(10, Duration::from_millis(700))
        .await
        .expect("receive");
    assert!(
        early.deliveries().is_empty(),
        "redelivered {:?} after the settle, before its delay",
        settled.elapsed()
    );
    drop(early);
    let again = queue
        .receive(10, Duration::from_secs(3))
        .await
        .expect("receive");
    let waited = settled.elapsed();
    assert_eq!(again.deliveries().len(), 1);
    let delivery = &again.deliveries()[0];
    assert_eq!(delivery.event_id, Some(sent[1].event_id));
    assert_eq!(delivery.attempt, 2);
    assert!(waited >= delay - Duration::from_millis(50), "{waited:?}");
    again
        .settle(Settlement {
            done: vec![0],
            retry: vec![],
        })
        .await
        .expect("ack");
    assert_eq!(depth(&queue).await, 0);
}

#[tokio::test]
async fn a_batch_held_past_its_lease_stays_leased_and_comes_back_when_dropped() {
    let Some(fresh) = Fresh::new(Duration::from_secs(2)) else {
        return;
    };
    // Two processes' worth of queues on one consumer.
    let holder = fresh.open().await;
    let other = fresh.open().await;
    let sent = [message("leads.insert", "{}"), message("leads.insert", "{}")];
    holder.publish_messages(&sent).await.expect("publish");
    let held = holder
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(held.deliveries().len(), 2);

    // Held for 5 s, two and a half leases: in-progress acks keep it from the other worker.
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_secs(5) {
        let batch = other
            .receive(10, Duration::from_millis(500))
            .await
            .expect("receive");
        assert!(
            batch.deliveries().is_empty(),
            "redelivered after {:?} while still held",
            holding.elapsed()
        );
    }

    // Dropped unsettled: back at once (not a lease later), as the next delivery.
    let dropped = Instant::now();
    drop(held);
    let back = other
        .receive(10, Duration::from_secs(3))
        .await
        .expect("receive");
    let took = dropped.elapsed();
    assert_eq!(back.deliveries().len(), 2, "after {took:?}");
    assert!(back.deliveries().iter().all(|d| d.attempt == 2));
    assert!(
        took < Duration::from_secs(1),
        "given back at once: {took:?}"
    );

    // A delivery a settlement leaves out goes back too.
    back.settle(Settlement {
        done: vec![0],
        retry: vec![],
    })
    .await
    .expect("settle");
    let left_out = other
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(left_out.deliveries().len(), 1);
    assert_eq!(left_out.deliveries()[0].event_id, Some(sent[1].event_id));
    assert_eq!(left_out.deliveries()[0].attempt, 3);
    left_out
        .settle(Settlement {
            done: vec![0],
            retry: vec![],
        })
        .await
        .expect("ack");
}

#[tokio::test]
async fn depth_counts_waiting_and_leased_events_and_fullness_follows_it() {
    let Some(mut fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    fresh.options.capacity = 4;
    let queue = fresh.open().await;
    assert_eq!(depth(&queue).await, 0);
    assert!(!queue.is_full().await.expect("is_full"));
    let sent: Vec<_> = (0..5).map(|_| message("leads.insert", "{}")).collect();
    queue.publish_messages(&sent).await.expect("publish");
    assert_eq!(depth(&queue).await, 5);
    let batch = queue
        .receive(3, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(batch.deliveries().len(), 3, "at most max per receive");
    assert_eq!(depth(&queue).await, 5, "leased events still count");
    // The reading is at most 250 ms old.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queue.is_full().await.expect("is_full"), "5 of 4");
    batch
        .settle(Settlement {
            done: vec![0, 1, 2],
            retry: vec![],
        })
        .await
        .expect("ack");
    assert_eq!(depth(&queue).await, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queue.is_full().await.expect("is_full"), "2 of 4");
}

#[tokio::test]
async fn opening_says_what_is_wrong_with_the_server_or_the_stream() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    // Nothing listens there: a prompt error naming the setting.
    let nowhere: NatsSpec = "nats://127.0.0.1:1/X".parse().expect("a spec");
    let started = Instant::now();
    let error = NatsQueue::open(&nowhere, &fresh.options)
        .await
        .expect_err("nothing listens on port 1");
    assert!(started.elapsed() < Duration::from_secs(8));
    let text = error.to_string();
    assert!(text.contains("CRM_ANALYTICS_QUEUE"), "{text}");
    assert!(error.is_retryable(), "{text}");

    // A stream of that name with another retention: refused, saying what differs.
    let js = fresh.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: fresh.spec.stream.clone(),
        subjects: vec![format!("{}.events", fresh.spec.stream)],
        ..Default::default()
    })
    .await
    .expect("create a limits stream");
    let error = NatsQueue::open(&fresh.spec, &fresh.options)
        .await
        .expect_err("a limits stream is not a work queue");
    let text = error.to_string();
    assert!(
        matches!(error, QueueError::Setting(_)) && text.contains("WorkQueue"),
        "{text}"
    );

    // A work-queue stream with a limit that drops the oldest messages when reached: events
    // the relay already removed from the outbox could vanish, so it is refused.
    let Some(limited) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    js.create_stream(async_nats::jetstream::stream::Config {
        name: limited.spec.stream.clone(),
        subjects: vec![format!("{}.events", limited.spec.stream)],
        retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
        storage: async_nats::jetstream::stream::StorageType::File,
        max_messages: 1000,
        discard: async_nats::jetstream::stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await
    .expect("create a limited stream");
    let error = NatsQueue::open(&limited.spec, &limited.options)
        .await
        .expect_err("a stream that drops old messages loses events");
    let text = error.to_string();
    assert!(
        matches!(error, QueueError::Setting(_)) && text.contains("discard policy"),
        "{text}"
    );

    // Another stream whose subject is already taken: the setting to change is named.
    let Some(mut second) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    second.options.nats.subject = Some(format!("{}.events", fresh.spec.stream));
    let error = NatsQueue::open(&second.spec, &second.options)
        .await
        .expect_err("the subject belongs to the first stream");
    let text = error.to_string();
    assert!(text.contains("CRM_ANALYTICS_NATS_SUBJECT"), "{text}");
}

#[tokio::test]
async fn the_consumer_follows_a_changed_lease() {
    let Some(mut fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    fresh.open().await;
    fresh.options.lease = Duration::from_secs(7);
    fresh.open().await;
    let js = fresh.jetstream().await;
    let mut stream = js.get_stream(&fresh.spec.stream).await.expect("stream");
    let info = stream
        .consumer_info(&fresh.options.nats.consumer)
        .await
        .expect("consumer");
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(
        info.config.max_deliver, -1,
        "the workers park, not the server"
    );
    // A process that does not consume (status, the API, a relay) with another lease
    // leaves the workers' ack wait alone.
    fresh.options.lease = Duration::from_secs(2);
    fresh.options.consumes = false;
    fresh.open().await;
    let info = stream
        .consumer_info(&fresh.options.nats.consumer)
        .await
        .expect("consumer");
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    let stream_info = stream.info().await.expect("stream info");
    assert_eq!(
        stream_info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
}

#[tokio::test]
async fn the_pipeline_over_nats_is_exact() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.outbox_retention = Duration::from_secs(3600); // for assert_counts_match_outbox
                                                       // Opened through the factory, as `crm-analytics run` does.
    let spec = QueueSpec::Nats(fresh.spec.clone());
    let options = QueueOptions {
        capacity: args.queue_capacity,
        ..fresh.options.clone()
    };
    let queue = crm_analytics::queue::open(&spec, &pool, &options)
        .await
        .expect("open");
    assert_eq!(queue.backend(), "nats");
    let running = common::start_with(&db, &args, {
        let queue = queue.clone();
        move |_| queue
    })
    .await;
    common::run_workload(&pool, 3, 150, 11).await;

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
            .fetch_one(&pool)
            .await
            .expect("count the outbox");
        let queued = depth(&*queue).await;
        if outbox == 0 && queued == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not drain: outbox {outbox}, NATS {queued}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    common::assert_counts_match_outbox(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn an_event_sent_again_on_purpose_is_not_dropped_as_a_duplicate() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let queue = fresh.open().await;
    let event = message("leads.insert", "{}");
    queue
        .publish_messages(std::slice::from_ref(&event))
        .await
        .expect("publish");
    let batch = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(batch.deliveries().len(), 1);
    settle_done(batch).await;
    // Within the duplicate window: a relay's re-publish is dropped, an operator's
    // `failed retry` is not.
    queue
        .publish_messages(std::slice::from_ref(&event))
        .await
        .expect("re-publish");
    assert_eq!(depth(&queue).await, 0, "a re-published event id is dropped");
    queue
        .republish_messages(std::slice::from_ref(&event))
        .await
        .expect("send again");
    let batch = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    let ids: Vec<_> = batch.deliveries().iter().map(|d| d.event_id).collect();
    assert_eq!(
        ids,
        vec![Some(event.event_id)],
        "sent again, delivered again"
    );
    settle_done(batch).await;
}

async fn settle_done(batch: Box<dyn crm_analytics::queue::ReceivedBatch>) {
    let done = (0..batch.deliveries().len()).collect();
    batch
        .settle(Settlement {
            done,
            retry: vec![],
        })
        .await
        .expect("ack");
}

/// A poison event is parked after its attempts and put back by `crm-analytics failed
/// retry` within the stream's duplicate window: it is applied, not dropped as a duplicate.
#[tokio::test]
async fn a_parked_event_retried_at_once_is_applied() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.max_attempts = 2;
    args.retry_backoff = Duration::from_millis(200);
    let queue: Arc<dyn Queue> = Arc::new(fresh.open().await);
    let running = common::start_with(&db, &args, {
        let queue = queue.clone();
        move |_| queue
    })
    .await;
    let lead = Uuid::new_v4();
    common::insert_poison_lead(&pool, lead).await;
    common::run_workload(&pool, 2, 60, 29).await;
    common::drain_through(&pool, &*queue, Duration::from_secs(40)).await;
    let parked_event: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM crm_analytics.failed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(parked_event.len(), 1);
    // The operator fixes the payload (and the CRM has the lead, written without capture
    // so that the replay is its only event), then retries through the CLI.
    common::fix_poison_lead(&pool, lead).await;
    let mut command = std::process::Command::new(common::binary());
    command
        .args(["failed", "retry", "--all"])
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL");
    for (name, value) in fresh.env() {
        command.env(name, value);
    }
    let output = command.output().expect("run crm-analytics");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 events put back"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    common::drain_through(&pool, &*queue, Duration::from_secs(20)).await;
    running.stop().await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(parked, 0, "nothing parked again");
    let applied: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM crm_analytics.applied_events WHERE event_id = $1)",
    )
    .bind(parked_event[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        applied,
        "the retried event was applied, not dropped as a duplicate"
    );
    common::assert_exact(&pool).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn status_reports_a_stream_that_does_not_exist_and_does_not_create_it() {
    let Some(fresh) = Fresh::new(Duration::from_secs(30)) else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    // A name nothing has created (a typo in CRM_ANALYTICS_QUEUE).
    let queue = format!("{}/{}", fresh.url, fresh.spec.stream);
    let (code, json) =
        common::outage::status_command(&db.url, &[("CRM_ANALYTICS_QUEUE", queue)]).await;
    assert_eq!(code, Some(2), "{json}");
    assert_ne!(json["databases"]["queue"], "up", "{json}");
    let js = fresh.jetstream().await;
    assert!(
        js.get_stream(&fresh.spec.stream).await.is_err(),
        "status created the stream"
    );

    // Once a worker has created it, status reads it.
    fresh.open().await;
    let queue = format!("{}/{}", fresh.url, fresh.spec.stream);
    let env = [
        ("CRM_ANALYTICS_QUEUE", queue),
        (
            "CRM_ANALYTICS_NATS_CONSUMER",
            fresh.options.nats.consumer.clone(),
        ),
    ];
    let (code, json) = common::outage::status_command(&db.url, &env).await;
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["databases"]["queue"], "up", "{json}");
    db.finish(pool).await;
}
