//! `sealpost healthcheck`: one `GET /healthz` (or `/readyz`) to the server at
//! `SEALPOST_ADDR`, for a container `HEALTHCHECK` in an image with no shell
//! or curl. Exit 0 on a 200, 1 on anything else.
//!
//! One HTTP/1.1 request over a plain socket needs no HTTP client: it writes
//! the request and reads the status line. A wildcard listen address (`0.0.0.0`,
//! `::`) is probed on loopback. When sealpost terminates TLS itself
//! (`SEALPOST_TLS_CERT`), the probe speaks TLS and trusts exactly that
//! certificate: the address it dials (loopback) is not a name the
//! certificate could carry, and no CA is needed to recognise one's own
//! certificate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, both_names};

/// The longest status line read: `HTTP/1.1 200 OK` and then some.
const MAX_STATUS_LINE: usize = 1024;

pub async fn healthcheck(config: &Config, ready: bool, timeout: Duration) -> anyhow::Result<()> {
    let addr = probe_addr(config.addr);
    let path = if ready { "/readyz" } else { "/healthz" };
    let scheme = if config.serves_tls() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
    let tls = match &config.tls_cert {
        Some(cert) => Some(connector(cert)?),
        None => None,
    };
    let status = tokio::time::timeout(timeout, get(addr, tls, path))
        .await
        .map_err(|_| {
            anyhow!(
                "{url}: no answer within {}",
                humantime::format_duration(timeout)
            )
        })?
        .with_context(|| url.clone())?;
    if status != 200 {
        bail!("{url} answered {status}");
    }
    println!("{url}: {status}");
    Ok(())
}

/// Where to probe a server listening on `addr`: a wildcard address is
/// reached on loopback.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// The status code of `GET path`.
async fn get(addr: SocketAddr, tls: Option<TlsConnector>, path: &str) -> anyhow::Result<u16> {
    let tcp = TcpStream::connect(addr).await.context("connecting")?;
    match tls {
        None => exchange(tcp, addr, path).await,
        Some(connector) => {
            let stream = connector
                .connect(ServerName::from(addr.ip()), tcp)
                .await
                .context("TLS handshake")?;
            exchange(stream, addr, path).await
        }
    }
}

async fn exchange<S>(mut stream: S, addr: SocketAddr, path: &str) -> anyhow::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sealpost-healthcheck\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    let end = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if head.len() > MAX_STATUS_LINE {
            bail!("no status line in the first {MAX_STATUS_LINE} bytes");
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the connection closed before a status line");
        }
        head.extend_from_slice(&buf[..n]);
    };
    let line = String::from_utf8_lossy(&head[..end]);
    // `HTTP/1.1 200 OK`
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(version), Some(Ok(status))) if version.starts_with("HTTP/") => Ok(status),
        _ => bail!("not an HTTP status line: {line:?}"),
    }
}

/// A TLS client that trusts only the leaf certificate of `cert`.
fn connector(cert: &Path) -> anyhow::Result<TlsConnector> {
    let setting = || format!("{}, {}", cert.display(), both_names("SEALPOST_TLS_CERT"));
    let leaf = CertificateDer::pem_file_iter(cert)
        .and_then(|mut certs| certs.next().transpose())
        .with_context(|| format!("reading the TLS certificate {}", setting()))?
        .ok_or_else(|| anyhow!("no PEM certificate in {}", setting()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        leaf,
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts exactly one certificate, and checks as usual that the server
/// holds its key.
#[derive(Debug)]
struct Pinned {
    leaf: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        let probe = |addr: &str| probe_addr(addr.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(probe("[::]:8443"), "[::1]:8443");
        assert_eq!(probe("10.1.2.3:80"), "10.1.2.3:80");
    }
}
