//! `cargo xtask certs`: the mutual-TLS material a cluster (or a standalone setup) needs. One CA,
//! the agents' server certificate and the controller's client certificate, their keys, and the
//! two Secrets the manifests mount. cert-manager is the production path (docs/certificates.md);
//! this is for kind, labs and CI.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// The name the controller checks in the agents' certificates (`--agent-tls-name`).
pub const AGENT_NAME: &str = "fulgur-agent";
pub const CONTROLLER_NAME: &str = "fulgur-controller";
pub const NAMESPACE: &str = "fulgur-system";
pub const AGENT_SECRET: &str = "fulgur-agent-tls";
pub const CONTROLLER_SECRET: &str = "fulgur-controller-tls";

pub struct Options {
    /// Validity of every certificate, from now.
    pub days: u32,
    /// Extra names for the agent certificate, after `fulgur-agent`.
    pub dns_names: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            days: 365,
            dns_names: Vec::new(),
        }
    }
}

/// The files `write` made (the names the README's commands use).
pub struct Written {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub controller_cert: PathBuf,
    pub controller_key: PathBuf,
    /// Both Secrets, for `kubectl apply -f`.
    pub secrets: PathBuf,
}

struct Pem {
    cert: String,
    key: String,
}

/// Writes a fresh CA, both leaves, their keys and `secrets.yaml` into `dir` (created if needed).
/// Keys are written mode 0600.
pub fn write(dir: &Path, options: &Options) -> anyhow::Result<Written> {
    anyhow::ensure!(options.days > 0, "--days must be at least 1");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (not_before, not_after) = validity(options.days);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fulgur CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let ca = Pem {
        cert: ca_cert.pem(),
        key: ca_key.serialize_pem(),
    };

    let mut agent_names = vec![AGENT_NAME.to_owned()];
    for name in &options.dns_names {
        if !agent_names.contains(name) {
            agent_names.push(name.clone());
        }
    }
    let agent = leaf(
        &agent_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
        (not_before, not_after),
    )?;
    let controller = leaf(
        &[CONTROLLER_NAME.to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
        (not_before, not_after),
    )?;

    let written = Written {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        agent_cert: dir.join("agent.pem"),
        agent_key: dir.join("agent-key.pem"),
        controller_cert: dir.join("controller.pem"),
        controller_key: dir.join("controller-key.pem"),
        secrets: dir.join("secrets.yaml"),
    };
    write_file(&written.ca, &ca.cert, false)?;
    write_file(&written.ca_key, &ca.key, true)?;
    write_file(&written.agent_cert, &agent.cert, false)?;
    write_file(&written.agent_key, &agent.key, true)?;
    write_file(&written.controller_cert, &controller.cert, false)?;
    write_file(&written.controller_key, &controller.key, true)?;
    let secrets = [
        secret(AGENT_SECRET, &agent, &ca.cert),
        secret(CONTROLLER_SECRET, &controller, &ca.cert),
    ]
    .join("---\n");
    // The Secrets hold private keys too.
    write_file(&written.secrets, &secrets, true)?;
    Ok(written)
}

fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    // A little slack backwards for clocks slightly behind ours (kind nodes, CI runners).
    let before = now - std::time::Duration::from_secs(3600);
    let after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    (before, after)
}

fn leaf(
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, &KeyPair>,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> anyhow::Result<Pem> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A `kubernetes.io/tls` Secret with `ca.crt` beside the pair, as cert-manager writes it, so the
/// manifests mount either the same way. `stringData` keeps the PEM readable (no base64).
fn secret(name: &str, pair: &Pem, ca: &str) -> String {
    let block = |text: &str| {
        text.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}",
        block(&pair.cert),
        block(&pair.key),
        block(ca)
    )
}

fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(())
}
