//! The kit against the reference `order-service` binary, configured like the app's own process
//! tests: its own PostgreSQL database `order_test_conf_<random>` (the service creates it), its
//! own RabbitMQ virtual host `test-conf-<random>` (so every queue and exchange goes with it) and
//! Redis keys `test-conf-<random>:*`, all removed afterwards, even when the test fails. The
//! services are the local ones; `TEST_PG_URL` (an admin URL, database `postgres`),
//! `TEST_REDIS_URL` and `TEST_AMQP_URL` point elsewhere, as for the app's tests.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{kit, workspace_bin};

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Runs a local admin tool; whether it succeeded.
fn tool(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One isolated set of names, removed on drop.
#[derive(Debug)]
struct Isolation {
    suffix: String,
    pg_admin: String,
    redis: String,
    amqp: String,
    vhost: Option<String>,
}

impl Isolation {
    fn new() -> Isolation {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let suffix = format!("{:x}{:x}", std::process::id(), nanos % (1 << 40));
        let pg_admin = var("TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres");
        let redis = var("TEST_REDIS_URL", "redis://127.0.0.1:6379");
        let amqp = var("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let vhost = format!("test-conf-{suffix}");
        let own_vhost = tool("rabbitmqctl", &["-q", "add_vhost", &vhost])
            && tool(
                "rabbitmqctl",
                &[
                    "-q",
                    "set_permissions",
                    "-p",
                    &vhost,
                    "guest",
                    ".*",
                    ".*",
                    ".*",
                ],
            );
        let (amqp, vhost) = match (own_vhost, amqp.rsplit_once('/')) {
            (true, Some((base, _))) => (format!("{base}/{vhost}"), Some(vhost)),
            _ => (amqp, None),
        };
        Isolation {
            suffix,
            pg_admin,
            redis,
            amqp,
            vhost,
        }
    }

    fn database(&self) -> String {
        format!("order_test_conf_{}", self.suffix)
    }

    fn envs(&self) -> Vec<(String, String)> {
        let base = self
            .pg_admin
            .rsplit_once('/')
            .map_or(self.pg_admin.as_str(), |(b, _)| b);
        let prefix = format!("test-conf-{}", self.suffix);
        [
            ("DATABASE_URL", format!("{base}/{}", self.database())),
            ("REDIS_URL", self.redis.clone()),
            ("AMQP_URL", self.amqp.clone()),
            ("APP_GRPC_ADDR", "127.0.0.1:0".to_owned()),
            ("APP_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("APP_MQ_PREFIX", prefix.clone()),
            ("APP_REDIS_PREFIX", format!("{prefix}:")),
            ("APP_POLL_INTERVAL", "50ms".to_owned()),
            ("APP_CRON_INTERVAL", "1h".to_owned()),
            ("APP_DEPENDENCY_WAIT", "2s".to_owned()),
            ("APP_SHUTDOWN_BUDGET", "5s".to_owned()),
            ("APP_LOG_FORMAT", "json".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        let drop_db = format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.database()
        );
        tool("psql", &[&self.pg_admin, "-qc", &drop_db]);
        if let Some(vhost) = &self.vhost {
            tool("rabbitmqctl", &["-q", "delete_vhost", vhost]);
        }
        let pattern = format!("test-conf-{}:*", self.suffix);
        let keys = Command::new("redis-cli")
            .args(["-u", &self.redis, "--scan", "--pattern", &pattern])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = keys {
            let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            if !keys.is_empty() {
                let mut args = vec!["-u".to_owned(), self.redis.clone(), "del".to_owned()];
                args.extend(keys);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                tool("redis-cli", &args);
            }
        }
    }
}

#[test]
fn the_order_service_conforms() {
    let isolation = Isolation::new();
    let app = workspace_bin("order-service");
    let args = [
        "--json",
        "--slack-ms",
        "750",
        "--",
        app.to_str().expect("a UTF-8 path"),
    ];
    let run = kit(&args, &isolation.envs(), Duration::from_secs(150));
    assert_eq!(
        run.code,
        Some(0),
        "{:?}\n{}",
        run.with_status("fail"),
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["conformant"], true);
    assert!(
        run.with_status("warn").is_empty(),
        "{:?}",
        run.with_status("warn")
    );
    for id in [
        "step-replies",
        "sigterm-standalone",
        "exit-after-close",
        "socket-removed",
        "path-taken-exits",
        "hello-extensions",
        "traceparent-count",
        "traceparent-malformed",
        "traceparent-accepted",
    ] {
        assert_eq!(run.status(id), "pass", "{id}");
    }
    // Every sub-step of the order service has a handler.
    assert_eq!(run.status("unregistered-note"), "n-a");
}
