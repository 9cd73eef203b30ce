//! The interception CA: loads (or creates) the CA the clients trust, and mints a leaf certificate
//! per intercepted host, cached with its rustls server config (bounded, renewed before expiry).
//! Every leaf shares one signing key and one bounded TLS session cache, so a cached leaf costs
//! its certificate and little else, and clients resume sessions whichever host they reach.
//! The CA key is written 0600 and never logged.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use crate::metrics::LeafMetrics;

/// How long a minted leaf is valid, and when it is replaced.
const LEAF_VALIDITY: Duration = Duration::days(30);
const LEAF_RENEW_BEFORE: Duration = Duration::days(7);
/// TLS sessions kept for client resumption, across every leaf (a few hundred bytes each).
const TLS_SESSIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{present} exists but {missing} does not; restore the missing file or remove both to create a new CA")]
    HalfPresent { present: PathBuf, missing: PathBuf },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable private key (PKCS#8, SEC1 or PKCS#1; ECDSA or RSA)")]
    BadKey { path: PathBuf },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path} is not a usable CA certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} can be read by other users (mode {mode:03o}); a CA key must be private: run `chmod 600 {path}`")]
    KeyNotPrivate { path: PathBuf, mode: u32 },
    #[error("cannot mint a certificate for {host}: {reason}")]
    Mint { host: String, reason: String },
}

/// Whether `load_or_create` found the CA or made it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Origin {
    Loaded,
    Created,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// One key for every leaf: leaves live in memory only, and minting stays cheap.
    leaf_key: KeyPair,
    /// The same key, loaded once for rustls to sign handshakes with.
    leaf_signer: Arc<dyn SigningKey>,
    /// TLS sessions of every leaf, for resumption (rustls resumes only for the same SNI).
    sessions: Arc<dyn StoresServerSessions>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<LruCache<String, Leaf>>,
    metrics: LeafMetrics,
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: OffsetDateTime,
}

impl CertificateAuthority {
    /// Load the CA pair, or create it when both files are missing.
    pub fn load_or_create(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
        cache_size: usize,
    ) -> Result<(Self, Origin), CaError> {
        let origin = match (cert.exists(), key.exists()) {
            (true, true) => Origin::Loaded,
            (false, false) => {
                create(cert, key)?;
                Origin::Created
            }
            (true, false) => {
                return Err(CaError::HalfPresent {
                    present: cert.into(),
                    missing: key.into(),
                })
            }
            (false, true) => {
                return Err(CaError::HalfPresent {
                    present: key.into(),
                    missing: cert.into(),
                })
            }
        };
        Ok((Self::load(cert, key, provider, cache_size)?, origin))
    }

    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
        cache_size: usize,
    ) -> Result<Self, CaError> {
        key_is_private(key)?;
        let cert_pem = std::fs::read_to_string(cert).map_err(|source| CaError::Read {
            path: cert.into(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(key).map_err(|source| CaError::Read {
            path: key.into(),
            source,
        })?;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| CaError::NoCertificate { path: cert.into() })?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| CaError::BadKey { path: key.into() })?;
        // Check the pair with rustls (it reads every key format), then sign with rcgen.
        let signing = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|_| CaError::BadKey { path: key.into() })?;
        CertifiedKey::new(vec![ca_der.clone()], signing)
            .keys_match()
            .map_err(|_| CaError::Mismatch {
                cert: cert.into(),
                key: key.into(),
            })?;
        let key_pair =
            KeyPair::try_from(&key_der).map_err(|_| CaError::BadKey { path: key.into() })?;
        let issuer =
            Issuer::from_ca_cert_der(&ca_der, key_pair).map_err(|e| CaError::BadCertificate {
                path: cert.into(),
                reason: e.to_string(),
            })?;
        let leaf_key = KeyPair::generate().map_err(|e| CaError::Mint {
            host: String::new(),
            reason: e.to_string(),
        })?;
        let leaf_signer = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()))
            .map_err(|e| CaError::Mint {
                host: String::new(),
                reason: e.to_string(),
            })?;
        let cap = NonZeroUsize::new(cache_size).unwrap_or(NonZeroUsize::MIN);
        Ok(CertificateAuthority {
            issuer,
            ca_der,
            leaf_key,
            leaf_signer,
            sessions: ServerSessionMemoryCache::new(TLS_SESSIONS),
            provider,
            cache: Mutex::new(LruCache::new(cap)),
            metrics: LeafMetrics::default(),
        })
    }

    /// The rustls server config presenting a leaf for `host` (a DNS name or an IP literal),
    /// offering ALPN `h2` and `http/1.1`.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let now = OffsetDateTime::now_utc();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(leaf) = cache.get(host) {
                if leaf.renew_at > now {
                    self.metrics.hits.inc();
                    return Ok(leaf.config.clone());
                }
            }
        }
        self.metrics.misses.inc();
        let config = match self.mint(host, now) {
            Ok(config) => Arc::new(config),
            Err(e) => {
                self.metrics.mint_failures.inc();
                return Err(e);
            }
        };
        let leaf = Leaf {
            config: config.clone(),
            renew_at: now + LEAF_VALIDITY - LEAF_RENEW_BEFORE,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.put(host.to_string(), leaf);
        self.metrics.size.set(cache.len() as i64);
        Ok(config)
    }

    /// Report cache hits, misses and size to these metrics.
    pub fn with_metrics(mut self, metrics: LeafMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Leaves currently cached.
    #[cfg(test)]
    fn cached_leaves(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn mint(&self, host: &str, now: OffsetDateTime) -> Result<ServerConfig, CaError> {
        let fail = |reason: String| CaError::Mint {
            host: host.to_string(),
            reason,
        };
        let mut params = CertificateParams::default();
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.try_into()
                    .map_err(|e: rcgen::Error| fail(e.to_string()))?,
            ),
        };
        params.subject_alt_names = vec![san];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.not_before = now - Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let certified = CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            self.leaf_signer.clone(),
        );
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.session_storage = self.sessions.clone();
        // The provider's order (SHA-256 suites first: cheaper handshakes), not the client's.
        config.ignore_client_order = true;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Create a new CA (ECDSA P-256, ten years) at the two paths; the key is written 0600.
/// A CA key that group or others can read is refused, as ssh refuses such a private key: anyone
/// who can read it can mint certificates every client of the proxy trusts.
fn key_is_private(key: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(key).map_err(|source| CaError::Read {
        path: key.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyNotPrivate {
            path: key.into(),
            mode,
        });
    }
    Ok(())
}

pub fn create(cert: &Path, key: &Path) -> Result<(), CaError> {
    let key_pair = KeyPair::generate().map_err(|e| CaError::Mint {
        host: "CA".into(),
        reason: e.to_string(),
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "consent-proxy interception CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "consent-proxy");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    let ca = params.self_signed(&key_pair).map_err(|e| CaError::Mint {
        host: "CA".into(),
        reason: e.to_string(),
    })?;
    write_new(key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, ca.pem().as_bytes(), 0o644)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    #[test]
    fn creates_with_a_private_key_then_loads_and_mints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c/ca.pem"), dir.path().join("c/ca.key"));
        let (ca, origin) =
            CertificateAuthority::load_or_create(&cert, &key, provider(), 2).expect("creates");
        assert_eq!(origin, Origin::Created);
        assert_eq!(
            std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600
        );
        let a = ca.server_config("a.example").expect("mints");
        assert!(Arc::ptr_eq(
            &a,
            &ca.server_config("a.example").expect("cached")
        ));
        ca.server_config("127.0.0.1").expect("mints for an IP");
        ca.server_config("b.example").expect("mints");
        assert_eq!(ca.cached_leaves(), 2);
        let (_, origin) =
            CertificateAuthority::load_or_create(&cert, &key, provider(), 2).expect("loads");
        assert_eq!(origin, Origin::Loaded);
    }

    /// A CA as admins have it, made by the openssl CLI: SEC1 ECDSA and PKCS#1 RSA keys.
    #[test]
    fn loads_sec1_and_pkcs1_keys_made_by_openssl() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "openssl is required under CI=true"
            );
            eprintln!("skipping: no openssl CLI");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ]);
        openssl(&["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
        for (key, header) in [
            ("ec.key", "BEGIN EC PRIVATE KEY"),
            ("rsa.key", "BEGIN RSA PRIVATE KEY"),
        ] {
            let text = std::fs::read_to_string(dir.path().join(key)).expect("key");
            assert!(
                text.contains(header),
                "{key} is not in the format under test"
            );
            let cert = format!("{key}.pem");
            openssl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                key,
                "-subj",
                "/CN=admin CA",
                "-days",
                "2",
                "-out",
                &cert,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            private(&dir.path().join(key));
            let ca = CertificateAuthority::load(
                &dir.path().join(&cert),
                &dir.path().join(key),
                provider(),
                4,
            )
            .unwrap_or_else(|e| panic!("{key}: {e}"));
            ca.server_config("push.example")
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn rejects_half_pairs_and_mismatched_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        create(&cert, &key).expect("creates");
        std::fs::remove_file(&key).expect("removes");
        assert!(matches!(
            CertificateAuthority::load_or_create(&cert, &key, provider(), 1),
            Err(CaError::HalfPresent { .. })
        ));
        std::fs::write(&key, KeyPair::generate().expect("key").serialize_pem()).expect("writes");
        private(&key);
        assert!(matches!(
            CertificateAuthority::load(&cert, &key, provider(), 1),
            Err(CaError::Mismatch { .. })
        ));
        std::fs::write(&key, "garbage").expect("writes");
        assert!(matches!(
            CertificateAuthority::load(&cert, &key, provider(), 1),
            Err(CaError::BadKey { .. })
        ));
    }

    fn private(key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    #[test]
    fn a_key_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        create(&cert, &key).expect("creates");
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = CertificateAuthority::load_or_create(&cert, &key, provider(), 1)
                .err()
                .expect("refused");
            let text = err.to_string();
            assert!(
                matches!(err, CaError::KeyNotPrivate { .. })
                    && text.contains(&format!("chmod 600 {}", key.display())),
                "{mode:o}: {text}"
            );
        }
        private(&key);
        assert!(CertificateAuthority::load_or_create(&cert, &key, provider(), 1).is_ok());
    }
}
