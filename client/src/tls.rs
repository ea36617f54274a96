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

#[cfg(test)]
mod tests {
    /// reqwest built with `rustls-no-provider` panics at `build()` without
    /// a provider it can find; the client hands it one, and installs none.
    #[test]
    fn builds_on_ring_without_a_process_wide_provider() {
        let rest = crate::rest::Rest::new("https://relay.example.com").unwrap();
        assert!(rustls::crypto::CryptoProvider::get_default().is_none());
        let ring = rustls::crypto::ring::default_provider();
        let config = rest.tls();
        let ours = &config.crypto_provider().cipher_suites;
        assert!(!ours.is_empty());
        assert_eq!(
            ours.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            ring.cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        );
    }
}
