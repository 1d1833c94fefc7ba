//! Certificates made by the test: a private CA, a server certificate for `localhost` and 127.0.0.1, and client
//! certificates (one signed by the CA, one by a stranger CA), each as PEM text. Nothing here asserts anything.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// A certificate and its private key, PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The certificates one TLS test needs.
pub struct TestPki {
    /// The CA that signed `server` and `client` (what `--tls-client-ca` and clients' `--tls-ca` name).
    pub ca: String,
    pub server: Pem,
    pub client: Pem,
    /// A client certificate from another CA: a broker requiring client certificates must refuse it.
    pub stranger: Pem,
}

impl TestPki {
    pub fn new() -> TestPki {
        let (ours, theirs) = (authority("jobbroker test CA"), authority("some other CA"));
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("valid names");
        server.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        TestPki {
            ca: ours.pem(),
            server: signed(server, &ours),
            client: signed(CertificateParams::new(vec!["worker-1".to_owned()]).expect("valid"), &ours),
            stranger: signed(CertificateParams::new(vec!["intruder".to_owned()]).expect("valid"), &theirs),
        }
    }
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key")).expect("a CA certificate")
}

fn signed(params: CertificateParams, issuer: &CertifiedIssuer<'static, KeyPair>) -> Pem {
    let key = KeyPair::generate().expect("a key");
    let cert = params.signed_by(&key, issuer).expect("a signed certificate");
    Pem { cert: cert.pem(), key: key.serialize_pem() }
}
