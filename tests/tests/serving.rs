//! What a control plane serves besides its own API: Prometheus metrics, the
//! standard gRPC health service, and the UNIMPLEMENTED answers of services
//! that later work fills.

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
async fn grpc_health_and_unimplemented_services_answer() -> Result<()> {
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
    // RPCs of the contract that later work fills say so.
    let mut signals =
        sextant_proto::v1::signals_service_client::SignalsServiceClient::new(channel.clone());
    let err = signals
        .report_probes(futures_stream())
        .await
        .err()
        .context("report_probes succeeded")?;
    ensure!(err.code() == tonic::Code::Unimplemented, "{err:?}");
    ensure!(err.message().contains("not accepted yet"), "{err:?}");
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

/// An empty client stream of probe batches.
fn futures_stream() -> tokio_stream::Iter<std::vec::IntoIter<sextant_proto::v1::ProbeBatch>> {
    tokio_stream::iter(Vec::new())
}
