//! Liveness and readiness probes.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::state::AppState;

/// How long readiness waits for the database's answer. A stalled database
/// answers nothing, and a probe that hangs tells a load balancer nothing
/// either (and piles up one request per probe): past this the answer is
/// 503. Under AWS ALB's default probe timeout (5 s), Docker's (30 s) and
/// `sealpost healthcheck`'s (5 s); a Kubernetes probe with its default of
/// 1 s gives up first, which it counts as not ready too.
const READY_DEADLINE: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Ready {
    /// Always `ready`.
    status: &'static str,
    /// This server's name (`SEALPOST_NODE_ID`).
    node: String,
    /// `local` for a single server; `connected` or `disconnected` for a
    /// server of a cluster.
    broker: &'static str,
}

/// The process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process serves.", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The database answers within 2 s; 503 otherwise, so a load balancer
/// stops sending. Names the node and its broker's state: a node cut off
/// from NATS still accepts and stores (and is ready), but says so here.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "The database answers.", body = Ready), crate::api::openapi::Errors))]
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>> {
    let pinged = match tokio::time::timeout(READY_DEADLINE, state.store.ping()).await {
        Ok(pinged) => pinged.map_err(|err| err.to_string()),
        Err(_) => Err(format!("no answer within {READY_DEADLINE:?}")),
    };
    pinged.map_err(|error| {
        tracing::warn!(%error, "readiness check failed");
        Error::Unavailable
    })?;
    Ok(Json(Ready {
        status: "ready",
        node: state.node_id.to_string(),
        broker: state.broker.status().as_str(),
    }))
}
