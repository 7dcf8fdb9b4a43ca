//! TLS for the control protocol: a server certificate (rustls via tonic), and with a
//! client CA, mTLS (every client must present a certificate that CA signed).

use std::path::{Path, PathBuf};

use proto::job::CoordinatorSpec;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// PEM files of the server's TLS setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// mTLS: the CA client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS file {path}: {source}")]
pub struct TlsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl ServerTls {
    /// From `coordinator.tls_cert` / `tls_key` / `client_ca` (validation ensures cert and
    /// key come together); `None` = plaintext.
    pub fn from_spec(spec: &CoordinatorSpec) -> Option<Self> {
        let (cert, key) = (spec.tls_cert.as_ref()?, spec.tls_key.as_ref()?);
        Some(Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: spec.client_ca.as_ref().map(PathBuf::from),
        })
    }

    /// tonic's server config; reads the files now so a bad path fails at start.
    pub fn config(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read(ca)?))
                .client_auth_optional(false);
        }
        Ok(config)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        path: path.to_path_buf(),
        source,
    })
}
