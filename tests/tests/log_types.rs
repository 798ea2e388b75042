//! Every log line of a control-mode stop is typed JSON: one pod (quiesce + order-service, as the
//! other e2e tests start it) serves a CreateOrder and is terminated as kubelet does (preStop,
//! then SIGTERM); every line the supervisor, the app's agent and the app printed on the way must
//! be a JSON object whose numbers are numbers and whose strings hold no escaped JSON and no Rust
//! debug output. A failure lists every offending line with its source and field.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::kubelet;
use e2e::log_types::{Source, offences};
use e2e::manifest::PodManifest;
use e2e::pod::{Pod, PodOptions};
use e2e::sandbox::Sandbox;
use e2e::{hard_timeout, requests, serial};
use order_service::proto::order_service_client::OrderServiceClient;
use serde_json::Value;

/// How long the test may wait for the machine's e2e lock.
const WAIT_FOR_LOCK: Duration = Duration::from_secs(240);
/// The pod's start (migrations on a fresh database included).
const START_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_control_mode_stop_is_typed_json() {
    let _one_at_a_time = serial(WAIT_FOR_LOCK);
    hard_timeout(Duration::from_secs(150), async {
        let manifest = PodManifest::load().expect("read deploy/k8s/deployment.yaml");
        let sandbox = Sandbox::new().await;
        let mut pod = Pod::start("log-types", &sandbox, &PodOptions::default());
        let grpc = pod.app_grpc_addr(START_WITHIN).await;
        let mut client = OrderServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect to the app");
        client
            .create_order(requests::create_order(
                "log-types",
                &[("sku-1", 1, 100)],
                "k1",
            ))
            .await
            .expect("CreateOrder");
        let done = kubelet::terminate(&mut pod, &manifest, || {}).await;
        let lines = pod.lines();
        assert_eq!(done.exit_code, Some(0), "{}", pod.tail(80));

        let sources: BTreeSet<Source> = lines
            .iter()
            .filter_map(|l| l.json())
            .map(|v| Source::of(&v))
            .collect();
        for wanted in [Source::Supervisor, Source::Agent, Source::App] {
            assert!(
                sources.contains(&wanted),
                "no {wanted} line among the pod's {} lines:\n{}",
                lines.len(),
                pod.tail(80)
            );
        }
        let finished: Vec<Value> = lines
            .iter()
            .filter_map(|l| l.json())
            .filter(|v| v["message"] == "sub-step finished")
            .collect();
        assert_eq!(finished.len(), 8, "one agent line per sub-step end");
        assert!(
            finished.iter().all(|v| v["counts"].is_object()
                && v["duration_ms"].is_u64()
                && v["step"].is_u64()),
            "sub-step lines with untyped fields: {finished:?}"
        );

        let bad = offences(&lines);
        assert!(
            bad.is_empty(),
            "{} log field(s) not typed JSON:\n{}",
            bad.len(),
            bad.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    })
    .await;
}
