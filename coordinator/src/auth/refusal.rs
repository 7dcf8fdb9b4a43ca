//! Why the token check refused a call: [`AuthRefusal`]. A leaf, so the metrics can
//! export every reason from 0 without depending on the interceptor that counts them.

use std::fmt;

/// Why a call was answered UNAUTHENTICATED by the token check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthRefusal {
    /// The call carried no `authorization` metadata.
    MissingToken,
    /// A well-formed bearer token that is not the job's.
    WrongToken,
    /// `authorization` metadata that is not `Bearer <token>` in printable ASCII.
    MalformedToken,
}

impl AuthRefusal {
    /// Every refusal, in the order [`AuthRefusal::label`]s are exported.
    pub const ALL: [AuthRefusal; 3] = [
        AuthRefusal::MissingToken,
        AuthRefusal::WrongToken,
        AuthRefusal::MalformedToken,
    ];

    /// The `reason` label the refusal is counted under (stable snake_case).
    pub const fn label(self) -> &'static str {
        match self {
            AuthRefusal::MissingToken => "unauthenticated_missing_token",
            AuthRefusal::WrongToken => "unauthenticated_wrong_token",
            AuthRefusal::MalformedToken => "unauthenticated_malformed_token",
        }
    }
}

impl fmt::Display for AuthRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthRefusal::MissingToken => "no authorization metadata",
            AuthRefusal::WrongToken => "the bearer token is not the job's",
            AuthRefusal::MalformedToken => "the authorization metadata is not `Bearer <token>`",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_unauthenticated() {
        let labels: std::collections::HashSet<&str> =
            AuthRefusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), AuthRefusal::ALL.len());
        assert!(labels.iter().all(|l| l.starts_with("unauthenticated_")));
    }
}
