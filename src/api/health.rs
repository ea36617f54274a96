//! Liveness and readiness probes.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The process is up and serving.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The database answers; 503 otherwise, so a load balancer stops sending.
/// Names the node and its broker's state: a node cut off from NATS still
/// accepts and stores (and is ready), but says so here.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>> {
    state.store.ping().await.map_err(|err| {
        tracing::warn!(error = %err, "readiness check failed");
        Error::Unavailable
    })?;
    Ok(Json(json!({
        "status": "ready",
        "node": &*state.node_id,
        "broker": state.broker.status().as_str(),
    })))
}
