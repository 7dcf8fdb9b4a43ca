//! Acceptance of issue 6's security: a call without the job token, or with another one,
//! is UNAUTHENTICATED and changes nothing; with TLS a plaintext client fails; with mTLS a
//! client without a certificate fails. Certificates are generated here with rcgen.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use coordinator::ServerTls;
use proto::client::{self, ClientTls};
use proto::wire::{AcquireShardRequest, Role, StatusRequest};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

#[tokio::test]
async fn calls_without_the_token_or_with_another_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = serve(spec(&[]), dir.path(), false, None).await;
    let mut good = connect(&running).await;
    let before = status(&mut good).await;
    let addr = running.addr().to_string();

    for token in [None, Some("wrong-token")] {
        let mut bad = client::connect(&addr, token, None).await.unwrap();
        let err = bad
            .register(register_request(Role::Trainer, 7001))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
        let err = bad.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = bad
            .acquire_shard(AcquireShardRequest {
                worker_id: "w1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let after = status(&mut good).await;
    assert_eq!(essence(&before), essence(&after));
    assert!(after.ranks.is_empty(), "no worker was registered");
    let m = running.metrics();
    assert_eq!(m.rejected("unauthenticated_missing_token"), 3);
    assert_eq!(m.rejected("unauthenticated_wrong_token"), 3);
    // The journal holds only the job's start: nothing was decided.
    let journal = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
    assert_eq!(journal.lines().count(), 1, "{journal}");
}

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca_params, ca_key) = ca();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = write(dir.path(), "ca.pem", &ca_cert.pem());
        let issuer = Issuer::new(ca_params, ca_key);
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ),
            ("client", vec!["worker".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer).unwrap();
            write(dir.path(), &format!("{name}.pem"), &cert.pem());
            write(dir.path(), &format!("{name}.key"), &key.serialize_pem());
        }
        Self { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, mtls: bool) -> ServerTls {
        ServerTls {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mtls.then(|| self.ca.clone()),
        }
    }

    fn client(&self, with_cert: bool) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            identity: with_cert.then(|| (self.path("client.pem"), self.path("client.key"))),
            domain: Some("localhost".into()),
        }
    }
}

fn ca() -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "declip test CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params, key)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Status over `tls` (None = plaintext): Ok, or the error's text.
async fn try_status(addr: &str, tls: Option<&ClientTls>) -> Result<(), String> {
    let mut c = client::connect(addr, Some(TOKEN), tls)
        .await
        .map_err(|e| e.to_string())?;
    c.status(StatusRequest {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn with_tls_a_plaintext_client_fails_and_a_tls_client_works() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let running = serve(spec(&[]), dir.path(), false, Some(pki.server(false))).await;
    let addr = running.addr().to_string();
    assert!(try_status(&addr, None).await.is_err());
    try_status(&addr, Some(&pki.client(false))).await.unwrap();
    // TLS does not replace the token.
    let mut no_token = client::connect(&addr, None, Some(&pki.client(false)))
        .await
        .unwrap();
    let err = no_token.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn with_mtls_a_client_without_a_certificate_fails() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let running = serve(spec(&[]), dir.path(), false, Some(pki.server(true))).await;
    let addr = running.addr().to_string();
    assert!(try_status(&addr, Some(&pki.client(false))).await.is_err());
    assert!(try_status(&addr, None).await.is_err());
    try_status(&addr, Some(&pki.client(true))).await.unwrap();
}
