//! TLS for the listener, with rustls (ring provider) from PEM files. ALPN offers HTTP/2 (gRPC) and HTTP/1.1
//! (gRPC-web, metrics).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use smartfarm_core::{Error, Result};

/// Builds the TLS acceptor from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| Error::invalid("tls_cert", format!("cannot read {}: {error}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid("tls_cert", format!("{} holds no certificate", cert_path.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
        Error::invalid("tls_key", format!("cannot read a private key from {}: {error}", key_path.display()))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| Error::internal("choose tls versions", error))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| Error::invalid("tls_key", format!("the key does not fit the certificate: {error}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
