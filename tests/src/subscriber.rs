//! A raw config-stream subscriber, for tests that speak the distribution
//! protocol themselves (hostile or scripted nodes).

use anyhow::{Context, Result};
use sextant_proto::v1 as pb;

/// What a subscriber sends on, and the updates it receives.
pub type Stream = (
    tokio::sync::mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::ConfigUpdate>,
);

/// Opens a Subscribe stream to `url` whose first message is `first`.
pub async fn subscribe(url: &str, first: pb::SubscribeRequest) -> Result<Stream> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await?;
    let stream = pb::distribution_service_client::DistributionServiceClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// A hello from `node` of `kind`, holding version `held` (0: none), of
/// unknown digest.
pub fn hello(node: &str, kind: pb::NodeKind, held: u64) -> pb::SubscribeRequest {
    hello_holding(node, kind, held, "")
}

/// A hello from `node` of `kind`, holding version `held` whose update
/// carried `digest`.
pub fn hello_holding(
    node: &str,
    kind: pb::NodeKind,
    held: u64,
    digest: &str,
) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Hello(pb::Hello {
            node_id: node.into(),
            kind: kind.into(),
            version_held: held,
            digest_held: digest.into(),
            ..pb::Hello::default()
        })),
    }
}

/// The ACK of update `u`.
pub fn ack(u: &pb::ConfigUpdate) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Ack(pb::Ack {
            version: u.version,
            nonce: u.nonce.clone(),
        })),
    }
}

/// Reads one whole update (every chunk); returns its first chunk.
pub async fn whole(s: &mut tonic::Streaming<pb::ConfigUpdate>) -> Result<pb::ConfigUpdate> {
    let first = s.message().await?.context("stream ended")?;
    let mut u = first.clone();
    while !u.last {
        u = s.message().await?.context("stream ended mid-update")?;
    }
    Ok(first)
}
