//! What a control plane serves besides its own API: Prometheus metrics, the
//! standard gRPC health service, and clear refusals of bad signal input.

use anyhow::{ensure, Context, Result};
use sextant_tests::{example_fleet, http_get, ControlPlane};

#[test]
fn metrics_follow_the_routing_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start_with(
        dir.path(),
        Some(&example_fleet()),
        &["--metrics", "127.0.0.1:0"],
    )?;
    let metrics = cp.logged_addr("metrics")?;
    let (code, body) = http_get(metrics, "/metrics")?;
    ensure!(code == 200, "status {code}");
    ensure!(body.contains("sextant_routing_version 1\n"), "{body}");
    ensure!(body.contains("sextant_drains_active 0\n"), "{body}");
    ensure!(
        body.contains("sextant_edge_predicted_utilization_ratio{edge=\"ams1\"}"),
        "{body}"
    );
    cp.ctl()
        .run(["drain", "provider/cdn-a", "--reason", "provider incident"])?
        .ok()?;
    let body =
        sextant_tests::eventually(std::time::Duration::from_secs(5), "metrics update", || {
            let (_, body) = http_get(metrics, "/metrics").ok()?;
            body.contains("sextant_routing_version 2\n").then_some(body)
        })?;
    ensure!(body.contains("sextant_drains_active 1\n"), "{body}");
    let (code, body) = http_get(metrics, "/healthz")?;
    ensure!(code == 200 && body == "ok\n", "{code} {body}");
    let (code, _) = http_get(metrics, "/nope")?;
    ensure!(code == 404, "status {code}");
    Ok(())
}

#[tokio::test]
async fn grpc_health_answers_and_bad_signals_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), None)?;
    let channel = tonic::transport::Endpoint::from_shared(cp.url())?
        .connect()
        .await
        .context("connect")?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sextant.v1.FleetService".into(),
        })
        .await?
        .into_inner()
        .status;
    ensure!(
        status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "health status {status}"
    );
    // A malformed probe batch is refused, naming the field.
    let mut signals =
        sextant_proto::v1::signals_service_client::SignalsServiceClient::new(channel.clone());
    let err = signals
        .report_probes(probe_batches("probe-1", f64::NAN))
        .await
        .err()
        .context("report_probes succeeded")?;
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    ensure!(
        err.message()
            .contains("results[0].latency_ms must be a finite number"),
        "{err:?}"
    );
    let err = signals
        .report_probes(probe_batches("", 1.0))
        .await
        .err()
        .context("an empty vantage id was accepted")?;
    ensure!(err.message().contains("vantage_id must be"), "{err:?}");
    // Without a fleet, routing reads fail with a clear precondition.
    let out = cp.ctl().run(["routes", "www"])?;
    ensure!(
        !out.success && out.stderr.contains("apply a fleet first"),
        "{}",
        out.stderr
    );
    let out = cp.ctl().run(["drain", "region/eu-west", "--reason", "x"])?;
    ensure!(
        !out.success && out.stderr.contains("no fleet has been applied"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// A client stream of one probe batch from `vantage` about edge ams1.
fn probe_batches(
    vantage: &str,
    latency_ms: f64,
) -> tokio_stream::Iter<std::vec::IntoIter<sextant_proto::v1::ProbeBatch>> {
    tokio_stream::iter(vec![sextant_proto::v1::ProbeBatch {
        vantage_id: vantage.into(),
        results: vec![sextant_proto::v1::ProbeResult {
            edge: "ams1".into(),
            at_unix_ms: 0,
            ok: true,
            latency_ms,
            error: String::new(),
        }],
    }])
}
