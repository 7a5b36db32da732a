//! OpenSSL, independently of our code, accepts what the identity module
//! makes and writes: the CSR (self-signature, SPIFFE URI SAN), and the key,
//! chain and root files a [`CertStore`] writes for a certificate issued
//! through an intermediate CA.

#[path = "common/test_ca.rs"]
mod test_ca;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use meshvm_agent::config::RootCerts;
use meshvm_agent::identity::{CertStore, KeyAlgorithm, WorkloadKey, verify_issued};
use test_ca::TestCa;

const ID: &str = "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa";

/// Runs `openssl args…` in `dir`; its exit status and stdout + stderr.
fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl (install it, e.g. apt-get install openssl): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, text) = openssl(dir, args);
    assert!(ok, "openssl {} failed:\n{text}", args.join(" "));
    text
}

/// The PEM CERTIFICATE blocks of `text`, each with its trailing newline.
fn blocks(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

#[test]
fn openssl_accepts_the_csr_and_the_stored_chain() {
    let root = TestCa::root("cluster.local", "test root");
    let intermediate = root.intermediate("istiod intermediate");
    let roots = RootCerts::parse(&root.pem()).unwrap();
    for algorithm in KeyAlgorithm::ALL {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();

        // The CSR.
        let key = WorkloadKey::generate(algorithm).unwrap();
        let csr = key.csr_pem(ID).unwrap();
        fs::write(dir.join("csr.pem"), &csr).unwrap();
        let out = openssl_ok(dir, &["req", "-verify", "-noout", "-in", "csr.pem"]);
        assert!(out.contains("verify OK"), "{algorithm}: {out}");
        let out = openssl_ok(dir, &["req", "-noout", "-text", "-in", "csr.pem"]);
        assert!(out.contains(&format!("URI:{ID}")), "{algorithm}: {out}");
        assert!(
            out.contains("Subject: \n") || out.contains("Subject:\n"),
            "{out}"
        );

        // Issued through an intermediate, verified, stored.
        let leaf = intermediate.issue_now(&csr, ID);
        let chain = [leaf.clone(), intermediate.pem(), root.pem()];
        let cert = verify_issued(&chain, &key, ID, &roots, SystemTime::now()).unwrap();
        let store = CertStore::new(dir.join("certs"));
        store.save(&key, &cert).unwrap();

        // What openssl verifies is what the store wrote.
        let written = blocks(&fs::read_to_string(store.cert_chain_path()).unwrap());
        assert_eq!(written.len(), 3, "{algorithm}");
        fs::write(dir.join("leaf.pem"), &written[0]).unwrap();
        fs::write(
            dir.join("intermediates.pem"),
            written[1..written.len() - 1].concat(),
        )
        .unwrap();
        for purpose in [
            &[][..],
            &["-purpose", "sslserver"],
            &["-purpose", "sslclient"],
        ] {
            let mut args = vec![
                "verify",
                "-CAfile",
                "certs/root-cert.pem",
                "-untrusted",
                "intermediates.pem",
            ];
            args.extend_from_slice(purpose);
            args.push("leaf.pem");
            let out = openssl_ok(dir, &args);
            assert_eq!(out.trim(), "leaf.pem: OK", "{algorithm} {purpose:?}");
        }
        // The whole chain file as the untrusted set works too (root included).
        let out = openssl_ok(
            dir,
            &[
                "verify",
                "-CAfile",
                "certs/root-cert.pem",
                "-untrusted",
                "certs/cert-chain.pem",
                "leaf.pem",
            ],
        );
        assert_eq!(out.trim(), "leaf.pem: OK");
        // And openssl is not vacuously happy: without the intermediate there
        // is no path.
        let (ok, out) = openssl(
            dir,
            &["verify", "-CAfile", "certs/root-cert.pem", "leaf.pem"],
        );
        assert!(!ok, "{out}");

        let out = openssl_ok(
            dir,
            &[
                "x509",
                "-noout",
                "-ext",
                "subjectAltName",
                "-in",
                "leaf.pem",
            ],
        );
        assert!(out.contains("critical"), "{out}");
        assert!(out.contains(&format!("URI:{ID}")), "{algorithm}: {out}");

        // key.pem is a key openssl reads, and the certificate's key.
        let from_key = openssl_ok(dir, &["pkey", "-in", "certs/key.pem", "-pubout"]);
        let from_cert = openssl_ok(dir, &["x509", "-noout", "-pubkey", "-in", "leaf.pem"]);
        assert_eq!(from_key, from_cert, "{algorithm}");
        let out = openssl_ok(dir, &["pkey", "-in", "certs/key.pem", "-noout", "-text"]);
        let expected = match algorithm {
            KeyAlgorithm::EcdsaP256 => "NIST CURVE: P-256",
            KeyAlgorithm::EcdsaP384 => "NIST CURVE: P-384",
            KeyAlgorithm::Rsa2048 => "Private-Key: (2048 bit, 2 primes)",
        };
        assert!(
            out.contains(expected),
            "{algorithm}: {}",
            out.lines().next().unwrap_or("")
        );
    }
}
