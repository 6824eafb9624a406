//! TLS on the HTTP listeners (`[api.tls] cert` and `key`): rustls, loaded once at start-up.
//!
//! A listener with TLS settings serves only HTTPS: the handshake runs on the connection's own
//! task, bounded by the header timeout, so a client that never finishes it holds nothing for
//! long and never stops the accept loop.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::settings::ConfigError;

/// `[api.tls]`: the PEM files of a listener's certificate chain and private key (both set, or
/// neither: plain HTTP).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// A listener's TLS, loaded and checked at start-up.
#[derive(Clone)]
pub struct ServerTls(pub TlsAcceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

/// A listener's TLS: `None` when `files` sets neither file. `section` names the keys in
/// errors (e.g. `api.tls`).
pub fn server(section: &str, files: &TlsFiles) -> Result<Option<ServerTls>, ConfigError> {
    acceptor(section, files).map(|a| a.map(ServerTls))
}

/// `[rpc.tls]`: this service's certificate and key for its RPC listener, and the CA file that
/// the other service's RPC certificate must chain to (all three set, or none).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcTlsFiles {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// The link's TLS: the acceptor of this service's RPC listener, and the connector that calls
/// the other service, verifying its certificate against the configured CA.
#[derive(Clone)]
pub struct RpcTls {
    pub acceptor: TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for RpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcTls(..)")
    }
}

/// The link's TLS from `[rpc.tls]`; `None` when none of its files is set.
pub fn rpc(files: &RpcTlsFiles) -> Result<Option<RpcTls>, ConfigError> {
    let server_files = TlsFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
    };
    match (acceptor("rpc.tls", &server_files)?, files.ca.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => Err(ConfigError::invalid(
            "rpc.tls.cert",
            "\"\"",
            "must be set with rpc.tls.ca (and rpc.tls.key)",
        )),
        (Some(_), true) => Err(ConfigError::invalid(
            "rpc.tls.ca",
            "\"\"",
            "must be set with rpc.tls.cert: the CA the other service's certificate chains to",
        )),
        (Some(acceptor), false) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(Path::new(&files.ca))
                    .and_then(|certs| certs.collect::<Result<_, _>>())
                    .map_err(|e| {
                        ConfigError::invalid("rpc.tls.ca", format!("{:?}", files.ca), e)
                    })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError::invalid(
                    "rpc.tls.ca",
                    format!("{:?}", files.ca),
                    "holds no usable PEM certificate",
                ));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| ConfigError::invalid("rpc.tls.ca", format!("{:?}", files.ca), e))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Some(RpcTls {
                acceptor,
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            }))
        }
    }
}

fn acceptor(section: &str, files: &TlsFiles) -> Result<Option<TlsAcceptor>, ConfigError> {
    match (files.cert.is_empty(), files.key.is_empty()) {
        (true, true) => return Ok(None),
        (false, true) => {
            return Err(ConfigError::invalid(
                &format!("{section}.key"),
                "\"\"",
                format!("must be set with {section}.cert"),
            ));
        }
        (true, false) => {
            return Err(ConfigError::invalid(
                &format!("{section}.cert"),
                "\"\"",
                format!("must be set with {section}.key"),
            ));
        }
        (false, false) => {}
    }
    let cert_key = format!("{section}.cert");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(Path::new(&files.cert))
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| ConfigError::invalid(&cert_key, format!("{:?}", files.cert), e))?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            &cert_key,
            format!("{:?}", files.cert),
            "holds no PEM certificate",
        ));
    }
    let key_key = format!("{section}.key");
    // The key's file name may be shown; its contents never are.
    let key = PrivateKeyDer::from_pem_file(Path::new(&files.key))
        .map_err(|e| ConfigError::invalid(&key_key, format!("{:?}", files.key), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| {
            ConfigError::invalid(
                &key_key,
                format!("{:?}", files.key),
                format!("does not go with {cert_key}: {e}"),
            )
        })?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cert: &str, key: &str) -> TlsFiles {
        TlsFiles {
            cert: cert.to_string(),
            key: key.to_string(),
        }
    }

    #[test]
    fn neither_file_is_plain_http_and_half_a_setting_or_a_bad_file_names_its_key() {
        assert!(server("api.tls", &files("", "")).unwrap().is_none());
        let half = server("api.tls", &files("/etc/cert.pem", "")).unwrap_err();
        assert!(half.to_string().contains("api.tls.key"), "{half}");
        let other_half = server("api.tls", &files("", "/etc/key.pem")).unwrap_err();
        assert!(
            other_half.to_string().contains("api.tls.cert"),
            "{other_half}"
        );
        let missing = server("api.tls", &files("/no/such/cert.pem", "/no/such/key.pem"));
        assert!(missing.unwrap_err().to_string().contains("api.tls.cert"));
        let dir = std::env::temp_dir().join(format!("rondo-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("cert.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let text = not_pem.display().to_string();
        let empty = server("api.tls", &files(&text, "/no/such/key.pem")).unwrap_err();
        assert!(empty.to_string().contains("no PEM certificate"), "{empty}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
