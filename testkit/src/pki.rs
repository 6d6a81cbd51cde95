//! Throwaway certificates for mutual TLS in tests and the demo: a CA, an agent (server)
//! certificate for the name `fulgur-agent`, and a controller (client) certificate.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The DNS name in the agent certificate; clients verify it.
pub const AGENT_NAME: &str = "fulgur-agent";

pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn leaf(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, &KeyPair>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// A fresh CA and the two leaf certificates it signs.
    pub fn generate(ca_name: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let (server_cert_pem, server_key_pem) =
            leaf(AGENT_NAME, ExtendedKeyUsagePurpose::ServerAuth, &issuer)?;
        let (client_cert_pem, client_key_pem) = leaf(
            "fulgur-controller",
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        )?;
        Ok(Pki {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        })
    }

    /// Writes `ca.pem`, `agent.pem`, `agent-key.pem`, `controller.pem`, `controller-key.pem`.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<PkiFiles> {
        std::fs::create_dir_all(dir)?;
        let files = PkiFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("agent.pem"),
            server_key: dir.join("agent-key.pem"),
            client_cert: dir.join("controller.pem"),
            client_key: dir.join("controller-key.pem"),
        };
        std::fs::write(&files.ca, &self.ca_pem)?;
        std::fs::write(&files.server_cert, &self.server_cert_pem)?;
        std::fs::write(&files.server_key, &self.server_key_pem)?;
        std::fs::write(&files.client_cert, &self.client_cert_pem)?;
        std::fs::write(&files.client_key, &self.client_key_pem)?;
        Ok(files)
    }

    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.server_cert_pem,
                &self.server_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client TLS trusting this CA; with this PKI's client certificate when `identify`.
    pub fn client_tls(&self, identify: bool) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(AGENT_NAME);
        if identify {
            config.identity(Identity::from_pem(
                &self.client_cert_pem,
                &self.client_key_pem,
            ))
        } else {
            config
        }
    }
}

pub struct PkiFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}
