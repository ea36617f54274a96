//! TLS termination: the certificate and key of `SEALPOST_TLS_CERT` and
//! `SEALPOST_TLS_KEY`, and [`TlsListener`], the listener [`crate::http1::serve`] takes
//! in place of a `TcpListener` to serve HTTPS and WSS.
//!
//! Handshakes run in tasks of their own, off the accept loop, so one slow or
//! silent client cannot hold up the others; each has a deadline, and their
//! number is capped, so half-open handshakes cannot pile up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::Listener;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::both_names;

/// How long a client has to complete its handshake. Generous for a phone on
/// a poor network (a handshake is two round trips); short enough that
/// sockets opened and left silent are soon closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. Each holds a socket and rustls's buffers
/// (tens of KiB) for at most [`HANDSHAKE_TIMEOUT`]; at the cap, new
/// connections wait in the kernel's accept backlog instead of in memory.
/// Far above what two cores complete in a timeout's worth of time.
const MAX_HANDSHAKES: usize = 1024;

/// Builds the TLS server configuration from PEM files. Errors name the file
/// and its setting, as start-up errors should.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "reading the TLS certificate {}, {}",
                cert.display(),
                both_names("SEALPOST_TLS_CERT")
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "no PEM certificate in {}, {}",
            cert.display(),
            both_names("SEALPOST_TLS_CERT")
        );
    }
    let private_key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading the TLS private key {}, {}",
            key.display(),
            both_names("SEALPOST_TLS_KEY")
        )
    })?;
    // An explicit provider, so nothing depends on a process-wide default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .with_context(|| {
            format!(
                "the TLS key {}, {}, does not fit the certificate {}, {}",
                key.display(),
                both_names("SEALPOST_TLS_KEY"),
                cert.display(),
                both_names("SEALPOST_TLS_CERT")
            )
        })?;
    // HTTP/1.1 only: the server does not speak HTTP/2, and WebSocket
    // upgrades need HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and yields them once their TLS handshake is done.
///
/// The handshakes are tasks in a `JoinSet` the listener owns: when serving drops
/// the listener at shutdown, the handshakes still in progress are aborted.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    /// Each yields the connection, or `None` if its handshake failed.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> Self {
        Self {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // Cancel-safe, as `http1::serve` needs at shutdown: all state lives in
    // `self`.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((tcp, addr)) => {
                        self.handshakes.spawn(handshake(self.acceptor.clone(), tcp, addr));
                    }
                    Err(err) => accept_error(err).await,
                },
                // `None` when no handshake is running: the branch is then
                // disabled and the select waits for a connection.
                Some(done) = self.handshakes.join_next() => match done {
                    Ok(Some(connection)) => return connection,
                    Ok(None) => {}
                    Err(err) => tracing::error!(error = %err, "TLS handshake task failed"),
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some((tls, addr)),
        // Scanners and clients that distrust the certificate end here all
        // the time: not worth more than debug.
        Ok(Err(err)) => {
            tracing::debug!(%addr, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            None
        }
    }
}

/// What axum does for its `TcpListener`: a peer that gave up before accept is
/// no news; anything else (out of file descriptors) is, and retrying at once
/// would spin, so wait a second.
async fn accept_error(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
