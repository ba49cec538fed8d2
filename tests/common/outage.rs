//! Broker outages for tests: a private NATS server that can be stopped and started again
//! on the same port and store, and a TCP relay in front of any server that can cut every
//! connection and refuse new ones for a while (the SQS-compatible server keeps its queues
//! in memory, so stopping it would lose what a real SQS keeps; cutting the network does not).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A NATS server with JetStream of this test's own, on a free port.
pub struct PrivateNats {
    pub port: u16,
    store: PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    /// Starts one, or None when `nats-server` is not installed (outside CI only).
    pub fn start() -> Option<Self> {
        let binary = which("nats-server")?;
        let port = free_port();
        let store = std::env::temp_dir().join(format!("nats-{}", uuid::Uuid::new_v4().simple()));
        let mut nats = Self {
            port,
            store,
            child: None,
        };
        nats.spawn(&binary);
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self, binary: &std::path::Path) {
        let child = std::process::Command::new(binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_listening(self.port, true);
    }

    /// Stops the server (SIGTERM, as an operator or an orchestrator would) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        wait_listening(self.port, false);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        let binary = which("nats-server").expect("nats-server");
        self.spawn(&binary);
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A TCP relay from a free local port to `target` that can be cut and restored.
pub struct Cuttable {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Cancelled to drop every open connection; replaced on each cut.
    connections: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Cuttable {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (accept_up, accept_connections, accept_stop) =
            (up.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                if !accept_up.load(Ordering::SeqCst) {
                    drop(inbound); // refused: the peer sees the connection closed at once
                    continue;
                }
                let cut = accept_connections.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            connections,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection and refuses new ones until [`Cuttable::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut current = self.connections.lock().expect("lock");
        current.cancel();
        *current = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/bin"])
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|path| path.is_file());
    if found.is_none() && std::env::var_os("CI").is_some() {
        panic!("{name} is not installed");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_listening(port: u16, listening: bool) {
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        let is = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok();
        if is == listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "port {port} did not become {}",
        if listening { "open" } else { "closed" }
    );
}

/// `crm-analytics status --json` as an operator runs it, with `env` naming the queue: its
/// exit code and the JSON it printed.
pub async fn status_command(
    db_url: &str,
    env: &[(&str, String)],
) -> (Option<i32>, serde_json::Value) {
    let mut command = tokio::process::Command::new(super::binary());
    command
        .args(["status", "--json"])
        .env("DATABASE_URL", db_url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("RUST_LOG", "error");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), command.output())
        .await
        .expect("status answers within 30 s")
        .expect("run status");
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), json)
}

/// While the broker is down: the relay has tried and failed (the claimed events went back
/// to the outbox with their retry count raised), and `status` says the queue is
/// unreachable while both databases are up and events wait in the outbox.
pub async fn assert_outage_seen(pool: &sqlx::PgPool, db_url: &str, env: &[(&str, String)]) {
    // A publish to a broker that went away fails once the client gives up on it (NATS
    // buffers while it reconnects and times out the acknowledgement).
    let since = std::time::Instant::now();
    loop {
        let retried: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM crm_analytics.event_outbox WHERE retry_count > 0",
        )
        .fetch_one(pool)
        .await
        .expect("outbox");
        if retried > 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "no failed publish was counted: the relay's publishes failed and it kept the events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, json) = status_command(db_url, env).await;
    assert_eq!(code, Some(2), "status exits 2 with the queue down: {json}");
    assert_eq!(json["databases"]["queue"], "unreachable", "{json}");
    assert_eq!(json["databases"]["crm"], "up", "{json}");
    assert_eq!(json["databases"]["analytics"], "up", "{json}");
    assert!(json["outbox_lag"].as_i64().unwrap_or(0) > 0, "{json}");
}
