//! Who may call what. Two kinds of callers, with distinct credentials:
//!
//! * **workers** (register, heartbeat, assignments, step reports, checkpoint commits, the rendezvous
//!   exchange, screen unit leases) prove themselves with a TLS client certificate signed by the CA given
//!   as `--tls-client-ca` (mutual TLS; rustls has verified the chain before a request arrives here);
//! * **clients** (submit, cancel and read jobs and screens, list workers) send `authorization: Bearer
//!   TOKEN` with one of the tokens of `--client-token-file`.
//!
//! A worker certificate cannot act as a client and a client token cannot act as a worker
//! (`PERMISSION_DENIED`); a call with no credential or a wrong one is `UNAUTHENTICATED`. Every refusal
//! happens before the call touches any state, and no message repeats a presented token.

use std::path::Path;

use tonic::{Request, Status};

/// The role a gRPC method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Client,
}

/// A bearer token, never printed.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Compares in time independent of where the first difference lies, so a caller cannot find a
    /// token a byte at a time.
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut difference = (a.len() != b.len()) as u8;
        for i in 0..a.len().max(b.len()) {
            difference |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
        }
        difference == 0
    }
}

/// Reads client tokens from a file: one per line (several allow rotation), blank lines and `#` comments
/// ignored. The error names the file, never its contents.
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<Token>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("cannot read the client token file {}: {e}", path.display())
    })?;
    let tokens: Vec<Token> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Token(l.to_string()))
        .collect();
    if tokens.is_empty() {
        anyhow::bail!(
            "the client token file {} holds no token (one per line expected)",
            path.display()
        );
    }
    if let Some(short) = tokens.iter().position(|t| t.0.len() < 16) {
        anyhow::bail!(
            "token {} of {} is shorter than 16 characters; use a random one, e.g. `openssl rand -hex 32`",
            short + 1,
            path.display()
        );
    }
    Ok(tokens)
}

/// The coordinator's access rules.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Client tokens; empty: client calls are open.
    pub client_tokens: Vec<Token>,
    /// Worker calls need a verified client certificate (mutual TLS is configured).
    pub workers_need_certificate: bool,
}

impl Access {
    /// Everything open: the embedded default and tests on loopback.
    pub fn open() -> Self {
        Self::default()
    }

    /// Lets `request` through when its caller may act as `role`.
    pub fn check<T>(&self, request: &Request<T>, role: Role) -> Result<(), Status> {
        let has_certificate = request.peer_certs().is_some_and(|chain| !chain.is_empty());
        let bearer = match request.metadata().get("authorization") {
            None => None,
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
                Some(value.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("the authorization header must read `Bearer TOKEN`")
                })?)
            }
        };
        let token_valid = bearer.is_some_and(|t| self.client_tokens.iter().any(|k| k.matches(t)));
        match role {
            Role::Worker if self.workers_need_certificate && !has_certificate => {
                if token_valid {
                    Err(Status::permission_denied(
                        "a client token cannot act as a worker: worker calls need a TLS client \
                         certificate signed by the coordinator's --tls-client-ca",
                    ))
                } else {
                    Err(Status::unauthenticated(
                        "worker calls need a TLS client certificate signed by the coordinator's \
                         --tls-client-ca; none was presented (give the worker --tls-cert and --tls-key)",
                    ))
                }
            }
            Role::Client if !self.client_tokens.is_empty() && !token_valid => match bearer {
                Some(_) => Err(Status::unauthenticated(
                    "the bearer token was not accepted by this coordinator",
                )),
                None if has_certificate => Err(Status::permission_denied(
                    "a worker certificate cannot submit, cancel or read jobs and screens: send a \
                     client bearer token (CELLFLEET_TOKEN or --token-file)",
                )),
                None => Err(Status::unauthenticated(
                    "this coordinator requires a bearer token: set CELLFLEET_TOKEN or pass --token-file",
                )),
            },
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_bearer(token: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }

    #[test]
    fn client_calls_need_one_of_the_tokens() {
        let access = Access {
            client_tokens: vec![
                Token("0123456789abcdef-old".into()),
                Token("0123456789abcdef-new".into()),
            ],
            workers_need_certificate: true,
        };
        assert!(access
            .check(&with_bearer("0123456789abcdef-new"), Role::Client)
            .is_ok());
        assert!(access
            .check(&with_bearer("0123456789abcdef-old"), Role::Client)
            .is_ok());
        let wrong = access
            .check(&with_bearer("0123456789abcdef-ne"), Role::Client)
            .unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated);
        assert!(!wrong.message().contains("0123456789abcdef"));
        let missing = access.check(&Request::new(()), Role::Client).unwrap_err();
        assert_eq!(missing.code(), Code::Unauthenticated);
        assert!(missing.message().contains("CELLFLEET_TOKEN"));
        // Without a certificate (no TLS in a unit test), a valid client token may not act as a worker.
        let as_worker = access
            .check(&with_bearer("0123456789abcdef-new"), Role::Worker)
            .unwrap_err();
        assert_eq!(as_worker.code(), Code::PermissionDenied);
        let anonymous_worker = access.check(&Request::new(()), Role::Worker).unwrap_err();
        assert_eq!(anonymous_worker.code(), Code::Unauthenticated);
    }

    #[test]
    fn open_access_lets_everything_through() {
        let access = Access::open();
        assert!(access.check(&Request::new(()), Role::Client).is_ok());
        assert!(access.check(&Request::new(()), Role::Worker).is_ok());
    }

    #[test]
    fn token_files_refuse_empty_and_short_tokens_without_printing_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# rotated monthly\n\n").unwrap();
        assert!(read_tokens(&path)
            .unwrap_err()
            .to_string()
            .contains("holds no token"));
        std::fs::write(&path, "short-secret\n").unwrap();
        let error = read_tokens(&path).unwrap_err().to_string();
        assert!(error.contains("shorter than 16") && !error.contains("short-secret"));
        std::fs::write(&path, "  0123456789abcdef0123  \n").unwrap();
        assert_eq!(read_tokens(&path).unwrap().len(), 1);
    }
}
