//! TLS: the client-facing server config (reloadable), backend client configs (`require` / `verify-full`), the
//! SCRAM channel-binding data of the served certificate, and self-signed certificates for dev mode.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::Digest;

use crate::config::{BackendTls, TlsConfig};

/// ALPN protocol name of PostgreSQL (required for direct TLS, PG17+).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded certificate: the acceptor and its channel-binding data.
pub struct TlsSnapshot {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `tls-server-end-point` binding data (RFC 5929), when the certificate's signature hash is known.
    pub channel_binding: Option<Vec<u8>>,
}

/// The client-facing TLS configuration; [`TlsServer::reload`] swaps in new certificate files.
pub struct TlsServer {
    paths: TlsConfig,
    current: RwLock<Arc<TlsSnapshot>>,
}

impl TlsServer {
    pub fn load(paths: &TlsConfig) -> anyhow::Result<TlsServer> {
        let snap = load_snapshot(&paths.cert, &paths.key)?;
        Ok(TlsServer {
            paths: paths.clone(),
            current: RwLock::new(Arc::new(snap)),
        })
    }

    pub fn current(&self) -> Arc<TlsSnapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the certificate and key; on error the old ones stay in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let snap = Arc::new(load_snapshot(&self.paths.cert, &self.paths.key)?);
        match self.current.write() {
            Ok(mut g) => *g = snap,
            Err(p) => *p.into_inner() = snap,
        }
        Ok(())
    }
}

fn load_snapshot(cert: &Path, key: &Path) -> anyhow::Result<TlsSnapshot> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate found in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let channel_binding = tls_server_end_point(&certs[0]);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsSnapshot {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        channel_binding,
    })
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with its signature's hash (SHA-256 for MD5/SHA-1).
/// `None` for signature algorithms without a defined hash (e.g. Ed25519): then SCRAM-SHA-256-PLUS is not offered.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(cert)?;
    // OID bodies (DER, without tag/length) of the common signature algorithms.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let hash = match oid {
        [p @ .., last] if p == RSA => match last {
            4 | 5 | 11 | 14 => 256, // md5, sha1, sha256, sha224
            12 => 384,
            13 => 512,
            _ => return None,
        },
        [p @ .., last] if p == ECDSA => match last {
            2 => 256,
            3 => 384,
            4 => 512,
            _ => return None,
        },
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => 256, // ecdsa-with-SHA1
        _ => return None,
    };
    Some(match hash {
        384 => sha2::Sha384::digest(cert).to_vec(),
        512 => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    })
}

/// The OID of `Certificate.signatureAlgorithm` (the second element of the outer SEQUENCE).
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len)?;
        Some((tag, b.get(hdr..end)?, b.get(end..)?))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, _tbs, rest) = tlv(cert)? else {
        return None;
    };
    let (0x30, alg, _) = tlv(rest)? else {
        return None;
    };
    let (0x06, oid, _) = tlv(alg)? else {
        return None;
    };
    Some(oid)
}

/// Client config for TLS towards a backend cluster.
pub fn backend_client_config(
    mode: BackendTls,
    ca_file: Option<&Path>,
) -> anyhow::Result<Option<Arc<ClientConfig>>> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let cfg = match mode {
        BackendTls::Disable => return Ok(None),
        BackendTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        BackendTls::VerifyFull => {
            let path = ca_file.context("verify-full needs ca_file")?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                roots.add(c.with_context(|| format!("parsing {}", path.display()))?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(cfg)))
}

/// A tokio-postgres connector for pgweir's own connections to a backend cluster (storage sampling): `cfg` gets
/// the SSL mode of `mode`, and the connector encrypts as the data path does (`require`: encrypted, certificate not
/// checked; `verify-full`: checked against `ca_file`).
pub fn postgres_connector(
    cfg: &mut tokio_postgres::Config,
    mode: BackendTls,
    ca_file: Option<&Path>,
) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let client = match backend_client_config(mode, ca_file)? {
        Some(c) => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            c
        }
        None => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            // Never used: the connection is not encrypted.
            backend_client_config(BackendTls::Require, None)?.context("a require config")?
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        Arc::unwrap_or_clone(client),
    ))
}

/// `sslmode=require` semantics: encrypted, certificate not checked.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes a self-signed certificate for `names` to `cert`/`key` (PEM) unless both files exist already.
pub fn ensure_self_signed(cert: &Path, key: &Path, names: &[&str]) -> anyhow::Result<()> {
    if cert.is_file() && key.is_file() {
        return Ok(());
    }
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    std::fs::write(cert, ck.cert.pem())?;
    std::fs::write(key, ck.signing_key.serialize_pem())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_of_a_generated_certificate() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("generate a self-signed certificate");
        let der = ck.cert.der().to_vec();
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        assert_eq!(
            tls_server_end_point(&der),
            Some(sha2::Sha256::digest(&der).to_vec())
        );
        assert_eq!(tls_server_end_point(&der[..10]), None);
        assert_eq!(tls_server_end_point(&[]), None);
    }
}
