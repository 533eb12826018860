//! TLS for the proxy: towards clients with `[proxy] tls_cert` / `tls_key`, towards the server
//! as the plan URL's `sslmode` says (the same rules as the coordinator's connections).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ProxyError;

/// Read half of a client or server stream, plain or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// Write half of a client or server stream, plain or TLS.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Splits a TCP stream without a lock between the halves.
pub fn split_plain(stream: tokio::net::TcpStream) -> (ReadHalf, WriteHalf) {
    let (read, write) = stream.into_split();
    (Box::new(read), Box::new(OneBuffer(write)))
}

/// A TCP write half that says it has no vectored writes. The codec's buffer is one
/// contiguous slice anyway, so writes go out through `send` rather than `writev`, which
/// costs the kernel less per call.
struct OneBuffer(tokio::net::tcp::OwnedWriteHalf);

impl AsyncWrite for OneBuffer {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

pub fn split<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
) -> (ReadHalf, WriteHalf) {
    let (read, write) = tokio::io::split(stream);
    (Box::new(read), Box::new(write))
}

/// The acceptor for client TLS, from PEM files.
pub fn acceptor(cert: &str, key: &str) -> Result<TlsAcceptor, ProxyError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| ProxyError::Tls(format!("cannot read {what}: {e}"));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ProxyError::Tls(format!("certificate and key do not fit: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The connector for server TLS.
pub fn connector() -> Result<TlsConnector, ProxyError> {
    let config = crate::pg::tls::client_config().map_err(|e| ProxyError::Tls(e.to_string()))?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name TLS uses for `host` (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, ProxyError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| ProxyError::Tls(format!("{host:?} is not a valid server name: {e}")))
}
