//! The job's bearer token on every RPC: a call without it, or with another one, is
//! answered UNAUTHENTICATED before it reaches the service (so it changes nothing), logged
//! with the peer address and counted by reason ([`AuthRefusal`]).

pub mod refusal;

use std::path::Path;
use std::sync::Arc;

use proto::auth::{parse_bearer, tokens_equal, METADATA_KEY, TOKEN_ENV};
use tonic::{Request, Status};

use crate::metrics::Metrics;
pub use refusal::AuthRefusal;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no job token: set {TOKEN_ENV} or coordinator.token_file")]
    Missing,
    #[error("token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the job token must be printable ASCII without spaces (it travels in a gRPC header)")]
    Malformed,
}

/// The job token: `DECLIP_TOKEN` if set, else the first line of `token_file`.
pub fn resolve_token(env: Option<String>, token_file: Option<&Path>) -> Result<String, TokenError> {
    let token = match (env.filter(|t| !t.is_empty()), token_file) {
        (Some(t), _) => t,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| TokenError::Read {
                path: path.display().to_string(),
                source,
            })?
            .trim()
            .to_string(),
        (None, None) => return Err(TokenError::Missing),
    };
    check_token(&token)?;
    Ok(token)
}

/// A token usable in a header: non-empty printable ASCII, no whitespace.
pub fn check_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::Malformed);
    }
    Ok(())
}

/// Checks the `authorization` metadata of every call.
#[derive(Clone)]
pub struct AuthInterceptor {
    token: Arc<str>,
    metrics: Arc<Metrics>,
}

impl AuthInterceptor {
    pub fn new(token: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            token: token.into(),
            metrics,
        }
    }

    fn refuse(&self, refusal: AuthRefusal, peer: Option<std::net::SocketAddr>) -> Status {
        let reason = refusal.label();
        self.metrics.reject(reason);
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        tracing::warn!(%peer, reason, "refused an unauthenticated call: {refusal}");
        Status::unauthenticated("a valid job token is required (authorization: Bearer <token>)")
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let peer = request.remote_addr();
        let Some(value) = request.metadata().get(METADATA_KEY) else {
            return Err(self.refuse(AuthRefusal::MissingToken, peer));
        };
        match value.to_str().ok().and_then(parse_bearer) {
            Some(token) if tokens_equal(token, &self.token) => Ok(request),
            Some(_) => Err(self.refuse(AuthRefusal::WrongToken, peer)),
            None => Err(self.refuse(AuthRefusal::MalformedToken, peer)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn token_from_env_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(
            resolve_token(Some("env".into()), Some(&file)).unwrap(),
            "env"
        );
        assert_eq!(resolve_token(None, Some(&file)).unwrap(), "from-file");
        assert!(matches!(
            resolve_token(None, None),
            Err(TokenError::Missing)
        ));
        assert!(matches!(
            resolve_token(Some("a b".into()), None),
            Err(TokenError::Malformed)
        ));
    }

    #[test]
    fn the_interceptor_counts_each_refusal() {
        let metrics = Arc::new(Metrics::default());
        let mut auth = AuthInterceptor::new("s3cret", metrics.clone());
        let mut req = |value: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = value {
                r.metadata_mut().insert(METADATA_KEY, v.parse().unwrap());
            }
            auth.call(r).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(req(Some("Bearer s3cret")), Ok(()));
        assert_eq!(req(None), Err(tonic::Code::Unauthenticated));
        assert_eq!(req(Some("Bearer nope")), Err(tonic::Code::Unauthenticated));
        assert_eq!(req(Some("Basic s3cret")), Err(tonic::Code::Unauthenticated));
        assert_eq!(metrics.rejected("unauthenticated_missing_token"), 1);
        assert_eq!(metrics.rejected("unauthenticated_wrong_token"), 1);
        assert_eq!(metrics.rejected("unauthenticated_malformed_token"), 1);
    }
}
