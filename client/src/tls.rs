//! The TLS settings of the `rustls` feature: rustls on the `ring`
//! provider (aws-lc-rs, rustls's default, is a C build the project avoids;
//! the server terminates TLS on ring too), verifying certificates with the
//! operating system's verifier, the one reqwest itself uses.
//!
//! The configuration is built here and handed to reqwest and to the
//! WebSocket explicitly, so the client neither needs nor installs a
//! process-wide `CryptoProvider`.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_platform_verifier::BuilderVerifierExt;

use crate::error::{Error, Result};

pub(crate) fn client_config() -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Protocol(format!("TLS settings: {e}")))?
        .with_platform_verifier()
        .map_err(|e| Error::Protocol(format!("TLS certificate verifier: {e}")))?
        .with_no_client_auth();
    Ok(config)
}
