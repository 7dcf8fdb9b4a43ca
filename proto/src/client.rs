//! Connecting to a coordinator: one function every client uses (workers, `coordinator
//! status`, tests), so the token, TLS and message limits are set the same way everywhere.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::auth;
use crate::wire::coordinator_client::CoordinatorClient;

/// Largest message either side accepts, in bytes (a job spec, a status with many ranks).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Environment variables that carry a client's TLS material (set by `coordinator launch`
/// for its workers, or by the operator).
pub const TLS_CA_ENV: &str = "DECLIP_TLS_CA";
pub const TLS_CERT_ENV: &str = "DECLIP_TLS_CERT";
pub const TLS_KEY_ENV: &str = "DECLIP_TLS_KEY";
pub const TLS_DOMAIN_ENV: &str = "DECLIP_TLS_DOMAIN";

/// TLS settings of a client: the CA that signed the coordinator's certificate, and for
/// mTLS the client's own certificate and key (PEM files).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to check the server certificate against (default: the address's host).
    pub domain: Option<String>,
}

impl ClientTls {
    /// From `DECLIP_TLS_CA` / `DECLIP_TLS_CERT` / `DECLIP_TLS_KEY` / `DECLIP_TLS_DOMAIN`;
    /// `None` when no CA is set (plaintext).
    pub fn from_env() -> Option<Self> {
        let ca = std::env::var_os(TLS_CA_ENV)?;
        let identity = match (
            std::env::var_os(TLS_CERT_ENV),
            std::env::var_os(TLS_KEY_ENV),
        ) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            _ => None,
        };
        Some(Self {
            ca: PathBuf::from(ca),
            identity,
            domain: std::env::var(TLS_DOMAIN_ENV).ok(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("coordinator address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("{path}: {source}")]
    ReadPem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the coordinator at {addr}: {source}")]
    Transport {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("the job token is not valid in a gRPC header (printable ASCII only)")]
    BadToken,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct TokenInterceptor {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert(auth::METADATA_KEY, value.clone());
        }
        Ok(request)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// The endpoint for `addr` (`host:port`, or a full `http(s)://` URI).
pub fn endpoint(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint, ConnectError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let bad = |reason: String| ConnectError::Address {
        addr: addr.to_string(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ConnectError::ReadPem {
                path: path.clone(),
                source,
            })
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| bad(format!("TLS: {e}")))?;
    }
    Ok(endpoint)
}

/// A client for the coordinator at `addr` that sends `token` with every call.
pub async fn connect(
    addr: &str,
    token: Option<&str>,
    tls: Option<&ClientTls>,
) -> Result<Client, ConnectError> {
    let channel =
        endpoint(addr, tls)?
            .connect()
            .await
            .map_err(|source| ConnectError::Transport {
                addr: addr.to_string(),
                source,
            })?;
    with_token(channel, token)
}

/// A client over an existing channel.
pub fn with_token(channel: Channel, token: Option<&str>) -> Result<Client, ConnectError> {
    let value = match token {
        Some(t) => Some(
            auth::bearer(t)
                .parse()
                .map_err(|_| ConnectError::BadToken)?,
        ),
        None => None,
    };
    Ok(
        CoordinatorClient::with_interceptor(channel, TokenInterceptor { value })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}
