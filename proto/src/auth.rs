//! How the job's bearer token travels: the `authorization` metadata of every RPC,
//! and the environment variable `coordinator launch` hands it to workers in (never
//! the command line, which other users of the machine can read).

/// Metadata key of the token (gRPC lower-cases header names).
pub const METADATA_KEY: &str = "authorization";

/// Environment variable that carries the job token to worker processes and CLIs.
pub const TOKEN_ENV: &str = "DECLIP_TOKEN";

/// The metadata value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token in an `authorization` value, if it is a well-formed bearer value.
pub fn parse_bearer(value: &str) -> Option<&str> {
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

/// Compares two tokens in time independent of where they first differ.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_round_trips_and_rejects_other_schemes() {
        assert_eq!(parse_bearer(&bearer("s3cret")), Some("s3cret"));
        assert_eq!(parse_bearer("Basic s3cret"), None);
        assert_eq!(parse_bearer("Bearer "), None);
        assert_eq!(parse_bearer("s3cret"), None);
    }

    #[test]
    fn token_comparison_needs_equal_bytes() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert!(!tokens_equal("", "a"));
    }
}
