//! TLS for connections to WNS: rustls with the web PKI roots plus any extra
//! CA from `wns.ca_file`, ALPN offering h2 then http/1.1.

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// Which application protocols the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`, then `http/1.1`: the server picks.
    H2AndHttp1,
    /// `http/1.1` only.
    Http1Only,
}

/// Builds the client TLS configuration.
///
/// `extra_ca` is a PEM file whose certificates are trusted in addition to
/// the public web roots (for a simulator or a test stand-in).
pub fn client_config(extra_ca: Option<&Path>, alpn: Alpn) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("wns.ca_file: cannot read {}", path.display()))?
        {
            let cert =
                cert.with_context(|| format!("wns.ca_file: {} is not valid PEM", path.display()))?;
            roots.add(cert).with_context(|| {
                format!(
                    "wns.ca_file: a certificate in {} is not a usable CA",
                    path.display()
                )
            })?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "wns.ca_file: {} holds no certificate",
            path.display()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = match alpn {
        Alpn::H2AndHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Alpn::Http1Only => vec![b"http/1.1".to_vec()],
    };
    cfg.enable_early_data = false;
    Ok(Arc::new(cfg))
}
