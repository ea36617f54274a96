//! Liveness and readiness probes.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::state::AppState;

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

/// The database answers; 503 otherwise, so a load balancer stops sending.
/// Names the node and its broker's state: a node cut off from NATS still
/// accepts and stores (and is ready), but says so here.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "The database answers.", body = Ready), crate::api::openapi::Errors))]
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>> {
    state.store.ping().await.map_err(|err| {
        tracing::warn!(error = %err, "readiness check failed");
        Error::Unavailable
    })?;
    Ok(Json(Ready {
        status: "ready",
        node: state.node_id.to_string(),
        broker: state.broker.status().as_str(),
    }))
}
