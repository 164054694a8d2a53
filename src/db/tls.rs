//! TLS for every PostgreSQL connection, over rustls, with libpq's `sslmode` semantics.
//!
//! | `sslmode`     | encrypted                   | certificate checked                          |
//! |---------------|-----------------------------|----------------------------------------------|
//! | `disable`     | never                       | –                                            |
//! | `prefer`      | when the server offers it   | no (chain only when a root cert is given)    |
//! | `require`     | always                      | no (chain only when a root cert is given)    |
//! | `verify-ca`   | always                      | chain against the root certificates          |
//! | `verify-full` | always                      | chain and the host name                      |
//!
//! The root certificates come from `sslrootcert=<file>` in the URL, else `PGSSLROOTCERT`; with
//! neither (or `sslrootcert=system`) `verify-ca`/`verify-full` use the system's store (the
//! bundled Mozilla roots when the system has none). A handshake that fails says why in one line.
//!
//! SCRAM channel binding (`tls-server-end-point`) is supported, so `channel_binding=require`
//! (which some managed services put in their URLs) works.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plaintext first; we treat it like `prefer`.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres negotiates (it knows only disable/prefer/require).
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// Where trusted root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The system's trust store.
    System,
}

/// The TLS settings of one connection target, ready to connect with.
#[derive(Clone)]
pub struct Tls {
    mode: SslMode,
    roots: Option<RootCert>,
    /// `None` for `sslmode=disable`.
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish()
    }
}

/// A TLS setting that cannot be used (a configuration error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Builds the rustls configuration for `mode` with `roots` (the file is read now, so a missing
    /// or unreadable CA file is a configuration error at start, not a connect failure later).
    pub fn new(mode: SslMode, roots: Option<RootCert>) -> Result<Tls, TlsSetupError> {
        if roots == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(TlsSetupError(format!(
                "sslrootcert=system needs sslmode=verify-full (got {})",
                mode.as_str()
            )));
        }
        let config = match mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(client_config(mode, roots.as_ref())?)),
        };
        Ok(Tls {
            mode,
            roots,
            config,
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    pub fn roots(&self) -> Option<&RootCert> {
        self.roots.as_ref()
    }

    /// What the root certificates are, for messages.
    fn roots_text(&self) -> String {
        match &self.roots {
            Some(RootCert::File(path)) => format!("the CA in {}", path.display()),
            _ => "the system's trusted CAs".to_string(),
        }
    }
}

fn client_config(mode: SslMode, roots: Option<&RootCert>) -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(format!("TLS setup failed: {e}")))?;
    let verify_chain = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) || roots.is_some();
    let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
        let store = match roots {
            Some(RootCert::File(path)) => load_file(path)?,
            Some(RootCert::System) | None => system_roots(),
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| TlsSetupError(format!("TLS setup failed: {e}")))?;
        if mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(NoVerification(provider))
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // As libpq 17 does: PostgreSQL 17 requires it with `sslnegotiation=direct`.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn load_file(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError(format!("cannot read sslrootcert {shown}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError(format!("sslrootcert {shown} is not a PEM file: {e}")))?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError(format!(
            "sslrootcert {shown} holds no usable CA certificate"
        )));
    }
    Ok(store)
}

fn system_roots() -> RootCertStore {
    let mut store = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    store
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked. rustls
/// checks the chain first and the name last, so a name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`/`prefer` without a root certificate: encrypted, the certificate not checked (the
/// handshake's signatures still are).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

impl<S> MakeTlsConnect<S> for Tls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, io::Error> {
        // Unix sockets have no host name, and the server never offers TLS on them; any name
        // does for the connector that will not be used.
        let name = if host.is_empty() { "localhost" } else { host };
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid host name for TLS"),
            )
        })?;
        Ok(Connect {
            config: self.config.clone(),
            server_name,
            host: name.to_string(),
            mode: self.mode,
            roots: self.roots_text(),
        })
    }
}

/// One connection's TLS handshake.
pub struct Connect {
    config: Option<Arc<ClientConfig>>,
    server_name: ServerName<'static>,
    host: String,
    mode: SslMode,
    roots: String,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.clone().ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "TLS is off (sslmode=disable)")
            })?;
            let connector = tokio_rustls::TlsConnector::from(config);
            match connector.connect(self.server_name.clone(), stream).await {
                Ok(tls) => Ok(Stream(tls)),
                Err(e) => Err(io::Error::new(e.kind(), self.explain(&e))),
            }
        })
    }
}

impl Connect {
    /// One line naming why the handshake failed.
    fn explain(&self, e: &io::Error) -> String {
        let mode = self.mode.as_str();
        let host = &self.host;
        let Some(rustls_error) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return format!("TLS handshake with {host} failed (sslmode={mode}): {e}");
        };
        match rustls_error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => format!(
                    "the server's certificate is not signed by {} (sslmode={mode}); give the \
                     server's CA with sslrootcert= or PGSSLROOTCERT",
                    self.roots
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    let names = match cert {
                        CertificateError::NotValidForNameContext { presented, .. } => {
                            format!(" (it names: {})", presented.join(", "))
                        }
                        _ => String::new(),
                    };
                    format!(
                        "the server's certificate is not valid for the host name {host:?}{names}; \
                         sslmode=verify-full checks it: connect by a name the certificate lists, \
                         or use sslmode=verify-ca"
                    )
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("the server's certificate has expired (sslmode={mode})")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!("the server's certificate is not valid yet (sslmode={mode})")
                }
                other => {
                    format!("the server's certificate was refused (sslmode={mode}): {other:?}")
                }
            },
            other => format!("TLS handshake with {host} failed (sslmode={mode}): {other}"),
        }
    }
}

/// A TLS stream to the server.
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let Some(cert) = session.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        match end_point_digest(cert) {
            Some(algorithm) => ChannelBinding::tls_server_end_point(
                ring::digest::digest(algorithm, cert).as_ref().to_vec(),
            ),
            None => ChannelBinding::none(),
        }
    }
}

/// The hash of `tls-server-end-point` (RFC 5929): the certificate's signature hash, with MD5 and
/// SHA-1 upgraded to SHA-256. `None` for algorithms without a defined binding (e.g. Ed25519).
fn end_point_digest(cert: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, ... }
    let (_, body, _) = der(cert)?;
    let (_, _tbs, rest) = der(body)?;
    let (_, algorithm, _) = der(rest)?;
    let (tag, oid, _) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    use ring::digest::{SHA256, SHA384, SHA512};
    match oid {
        [prefix @ .., 0x04 | 0x05 | 0x0b] if prefix == RSA => Some(&SHA256),
        [prefix @ .., 0x0c] if prefix == RSA => Some(&SHA384),
        [prefix @ .., 0x0d] if prefix == RSA => Some(&SHA512),
        [prefix @ .., 0x01] if prefix == ECDSA => Some(&SHA256),
        [prefix @ .., 0x03, 0x02] if prefix == ECDSA => Some(&SHA256),
        [prefix @ .., 0x03, 0x03] if prefix == ECDSA => Some(&SHA384),
        [prefix @ .., 0x03, 0x04] if prefix == ECDSA => Some(&SHA512),
        _ => None,
    }
}

/// One DER element: (tag, contents, the bytes after it).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_parse_like_libpq() {
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(SslMode::parse(text), Ok(mode));
            assert_eq!(mode.as_str(), text);
        }
        assert!(SslMode::parse("verify_full").is_err());
        assert!(SslMode::parse("").is_err());
    }

    #[test]
    fn der_reader_refuses_truncated_input() {
        assert_eq!(
            der(&[0x30, 0x02, 0x05, 0x00]),
            Some((0x30, &[0x05, 0x00][..], &[][..]))
        );
        assert_eq!(der(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der(&[]), None);
        assert!(end_point_digest(b"not a certificate").is_none());
    }

    #[test]
    fn a_missing_ca_file_is_a_setup_error() {
        let err = Tls::new(
            SslMode::VerifyFull,
            Some(RootCert::File("/nonexistent/ca.pem".into())),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read sslrootcert /nonexistent/ca.pem"),
            "{err}"
        );
        let err = Tls::new(SslMode::Require, Some(RootCert::System)).unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
    }
}
