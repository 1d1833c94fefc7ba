//! Checks of PEM files before they reach rustls, shared by the broker and the clients: a wrong file is reported
//! when the program starts, naming the file, rather than as an opaque error at the first handshake.
//!
//! Only the form is checked (the file holds a certificate, a key); whether a certificate is trusted is TLS's job.

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// Reads a PEM file that must hold at least one well-formed certificate. `setting` names it in errors (a flag).
pub fn read_certificates(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(setting, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {}: not a valid PEM certificate file: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{setting} {}: no PEM certificate found", path.display()));
    }
    Ok(pem)
}

/// Reads a PEM file that must hold a private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(setting, path)?;
    if PrivateKeyDer::from_pem_slice(&pem).is_err() {
        return Err(format!(
            "{setting} {}: no private key found (expected PEM: PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ));
    }
    Ok(pem)
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {setting} {}: {e}", path.display()))
}
