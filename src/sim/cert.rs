//! The simulator's certificates: a throw-away CA, generated at start, and a
//! leaf it signs for the WNS and login host names, served by rustls.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

/// Names the leaf certificate is valid for.
pub const LEAF_NAMES: [&str; 6] = [
    "*.notify.windows.com",
    "notify.windows.com",
    "login.live.com",
    "login.microsoftonline.com",
    "localhost",
    "127.0.0.1",
];

/// How long the generated certificates are valid (from one day back).
pub const VALIDITY_DAYS: i64 = 365;

/// A generated CA and the leaf it signed.
pub struct SimCerts {
    /// The CA certificate, PEM: what a client adds to its roots.
    pub ca_pem: String,
    /// The leaf certificate, DER.
    pub leaf: CertificateDer<'static>,
    /// The leaf's private key, PKCS#8 DER.
    pub leaf_key: PrivatePkcs8KeyDer<'static>,
}

/// Generates a CA and a leaf for [`LEAF_NAMES`].
pub fn generate() -> anyhow::Result<SimCerts> {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(VALIDITY_DAYS);

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("wnsgate sim CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;

    let leaf_key = KeyPair::generate().context("generating the leaf key")?;
    let mut leaf = CertificateParams::new(LEAF_NAMES.map(String::from).to_vec())
        .context("leaf certificate names")?;
    leaf.distinguished_name = name("wnsgate sim WNS");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .context("signing the leaf")?;

    Ok(SimCerts {
        ca_pem: ca_cert.pem(),
        leaf: leaf_cert.der().clone(),
        leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
    })
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "wnsgate simulator");
    dn
}

/// A rustls server configuration serving the leaf, offering `alpn` in order
/// of preference. Uses the ring provider explicitly.
pub fn server_config(
    certs: &SimCerts,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(
            vec![certs.leaf.clone()],
            PrivateKeyDer::Pkcs8(certs.leaf_key.clone_key()),
        )
        .context("TLS server certificate")?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_ca_and_a_usable_server_config() {
        let c = generate().unwrap();
        assert!(c.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let cfg = server_config(&c, &[b"h2", b"http/1.1"]).unwrap();
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
