//! The service set the agent programs and its one validation, for both sources: a services
//! file (read here) and a gRPC apply (converted in `grpc.rs`).

use std::{collections::BTreeSet, fmt, net::IpAddr, ops::Deref, path::Path};

use fulgur_common::limits::{MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT};
use serde::{Deserialize, Serialize};

/// Announced addresses at most (the size of the pinned announced-addresses map).
pub const MAX_ANNOUNCED: usize = fulgur_common::defaults::MAX_ANNOUNCED as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the maps hold it.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => fulgur_common::PROTO_TCP,
            Protocol::Udp => fulgur_common::PROTO_UDP,
        }
    }

    pub const fn from_number(number: u8) -> Option<Protocol> {
        match number {
            fulgur_common::PROTO_TCP => Some(Protocol::Tcp),
            fulgur_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// On another node: its new flows are SNATed to this node's address (`--snat remote`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub remote: bool,
}

fn default_weight() -> u32 {
    1
}

fn is_false(value: &bool) -> bool {
    !*value
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Weight of invalid backends: this share of new flows is rejected (TCP RST, ICMP port
    /// unreachable). A service with no weighted backend rejects everything.
    #[serde(default, rename = "rejectWeight")]
    pub reject_weight: u32,
}

/// The whole desired state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSet {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Gateway addresses this node announces: the XDP program answers ARP requests and
    /// neighbour solicitations for them on the attached interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announce: Vec<IpAddr>,
}

/// One problem with the input, with the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path} is invalid:\n  {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        path: String,
        errors: Vec<FieldError>,
    },
}

/// A service set that passed [`Draft::validate`]: the only kind the map writer takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidServiceSet(ServiceSet);

impl Deref for ValidServiceSet {
    type Target = ServiceSet;

    fn deref(&self) -> &ServiceSet {
        &self.0
    }
}

/// A value as its source gave it: parsed, or what is wrong with it.
pub type Parsed<T> = Result<T, String>;

/// A service set as a source reads it, before its validation. Values that did not parse carry
/// their problem, so every problem of an input is reported at once.
pub struct Draft {
    pub services: Vec<DraftService>,
    pub announce: Vec<Parsed<IpAddr>>,
    /// The reject weight's name in field paths: the file's `rejectWeight`, the proto's
    /// `reject_weight`.
    pub reject_weight_field: &'static str,
    /// Backends marked remote are accepted: SNAT is on (`--snat remote` or `always`).
    pub remote_backends: bool,
}

pub struct DraftService {
    pub vip: Parsed<IpAddr>,
    /// Wider than a port, so that the proto's out-of-range values are reported here too.
    pub port: u32,
    pub protocol: Parsed<Protocol>,
    pub backends: Vec<DraftBackend>,
    pub reject_weight: u32,
}

pub struct DraftBackend {
    pub address: Parsed<IpAddr>,
    pub port: u32,
    pub weight: u32,
    /// On another node (the proto's `remote`, the file's `remote`).
    pub remote: bool,
}

/// A port from 1 to 65535.
fn port(value: u32) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{value} is not a port (1-65535)")),
    }
}

fn problem(errors: &mut Vec<FieldError>, path: String, message: String) {
    errors.push(FieldError { path, message });
}

/// Records `value`'s problem, if it has one, under `path`.
fn report<T>(errors: &mut Vec<FieldError>, path: String, value: &Parsed<T>) {
    if let Err(message) = value {
        problem(errors, path, message.clone());
    }
}

fn weight(value: u32) -> Result<u32, String> {
    if value > MAX_WEIGHT {
        Err(format!("{value} is above {MAX_WEIGHT}"))
    } else {
        Ok(value)
    }
}

impl Draft {
    /// Checks everything and reports every problem at once, each with its field path.
    pub fn validate(self) -> Result<ValidServiceSet, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        let mut services = Vec::with_capacity(self.services.len());
        for (i, service) in self.services.into_iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            let service_port = port(service.port);
            report(&mut errors, at("port"), &service_port);
            let vip = service.vip.and_then(|vip| {
                if vip.is_unspecified() || vip.is_multicast() {
                    Err(format!("{vip} cannot be a service address"))
                } else {
                    Ok(vip)
                }
            });
            report(&mut errors, at("vip"), &vip);
            report(&mut errors, at("protocol"), &service.protocol);
            report(
                &mut errors,
                at(self.reject_weight_field),
                &weight(service.reject_weight),
            );
            if let (Ok(vip), Ok(protocol)) = (&vip, &service.protocol)
                && !seen.insert((*vip, service.port, *protocol))
            {
                problem(
                    &mut errors,
                    at("vip"),
                    format!("duplicate service {protocol} {vip}:{}", service.port),
                );
            }
            if service.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
                problem(
                    &mut errors,
                    at("backends"),
                    format!(
                        "{} backends, at most {MAX_BACKENDS_PER_SERVICE} are allowed",
                        service.backends.len()
                    ),
                );
            }
            let mut backends = Vec::with_capacity(service.backends.len());
            let mut backends_seen = BTreeSet::new();
            for (j, backend) in service.backends.into_iter().enumerate() {
                let at = |field: &str| format!("services[{i}].backends[{j}].{field}");
                let address = backend.address.and_then(|address| match &vip {
                    Ok(vip) if address.is_ipv4() != vip.is_ipv4() => Err(format!(
                        "{address} is not in the address family of the service address {vip}"
                    )),
                    _ => Ok(address),
                });
                report(&mut errors, at("address"), &address);
                let backend_port = port(backend.port);
                report(&mut errors, at("port"), &backend_port);
                report(&mut errors, at("weight"), &weight(backend.weight));
                if backend.remote && !self.remote_backends {
                    problem(
                        &mut errors,
                        at("remote"),
                        "this agent has no SNAT (--snat never; it does not list the \
                         \"remote-backends\" feature): a flow to another node's backend would be \
                         answered from that node's address, so the state is refused"
                            .into(),
                    );
                }
                if let Ok(address) = &address
                    && !backends_seen.insert((*address, backend.port))
                {
                    problem(
                        &mut errors,
                        at("address"),
                        format!("duplicate backend {address}:{}", backend.port),
                    );
                }
                if let (Ok(address), Ok(port)) = (address, backend_port) {
                    backends.push(BackendSpec {
                        address,
                        port,
                        weight: backend.weight,
                        remote: backend.remote,
                    });
                }
            }
            if let (Ok(vip), Ok(port), Ok(protocol)) = (vip, service_port, service.protocol) {
                services.push(ServiceSpec {
                    vip,
                    port,
                    protocol,
                    backends,
                    reject_weight: service.reject_weight,
                });
            }
        }
        let announce = announced(self.announce, &mut errors);
        if errors.is_empty() {
            Ok(ValidServiceSet(ServiceSet { services, announce }))
        } else {
            Err(errors)
        }
    }
}

impl ServiceSet {
    /// Reads and validates a YAML (or JSON) services file; `remote_backends`: SNAT is on.
    pub fn from_file(path: &Path, remote_backends: bool) -> Result<ValidServiceSet, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, shown, remote_backends)
    }

    /// Parses and validates the text of a services file; `origin` names it in errors.
    pub fn parse(
        text: &str,
        origin: String,
        remote_backends: bool,
    ) -> Result<ValidServiceSet, ConfigError> {
        let set: ServiceSet = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.clone(),
            source,
        })?;
        set.validate(remote_backends)
            .map_err(|errors| ConfigError::Invalid {
                path: origin,
                errors,
            })
    }

    /// The one validation ([`Draft::validate`]), with the file's field names.
    pub fn validate(&self, remote_backends: bool) -> Result<ValidServiceSet, Vec<FieldError>> {
        Draft {
            services: self
                .services
                .iter()
                .map(|s| DraftService {
                    vip: Ok(s.vip),
                    port: s.port.into(),
                    protocol: Ok(s.protocol),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| DraftBackend {
                            address: Ok(b.address),
                            port: b.port.into(),
                            weight: b.weight,
                            remote: b.remote,
                        })
                        .collect(),
                    reject_weight: s.reject_weight,
                })
                .collect(),
            announce: self.announce.iter().copied().map(Ok).collect(),
            reject_weight_field: "rejectWeight",
            remote_backends,
        }
        .validate()
    }
}

/// Announced addresses must be unicast addresses a neighbour could ask for, each listed once.
fn announced(addresses: Vec<Parsed<IpAddr>>, errors: &mut Vec<FieldError>) -> Vec<IpAddr> {
    if addresses.len() > MAX_ANNOUNCED {
        problem(
            errors,
            "announce".into(),
            format!(
                "{} addresses, at most {MAX_ANNOUNCED} are allowed",
                addresses.len()
            ),
        );
    }
    let mut seen = BTreeSet::new();
    let mut valid = Vec::with_capacity(addresses.len());
    for (i, address) in addresses.into_iter().enumerate() {
        let address = address.and_then(|address| match address {
            a if a.is_unspecified() || a.is_multicast() || a.is_loopback() => {
                Err(format!("{a} cannot be announced (not a unicast address)"))
            }
            IpAddr::V4(a) if a.is_broadcast() => {
                Err(format!("{a} cannot be announced (broadcast)"))
            }
            IpAddr::V6(a) if a.is_unicast_link_local() => Err(format!(
                "{a} cannot be announced (link-local: every interface has its own)"
            )),
            a if !seen.insert(a) => Err(format!("duplicate address {a}")),
            a => Ok(a),
        });
        report(errors, format!("announce[{i}]"), &address);
        valid.extend(address);
    }
    valid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ServiceSet {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn valid_file_parses_with_default_weight() {
        let set = parse(
            "services:\n- vip: 192.0.2.10\n  port: 80\n  protocol: TCP\n  backends:\n  - {address: 203.0.113.2, port: 8080}\n",
        );
        assert_eq!(*set.validate(true).unwrap(), set);
        assert_eq!(set.services[0].backends[0].weight, 1);
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let set = parse(
            r#"
services:
- vip: 192.0.2.10
  port: 0
  protocol: UDP
  backends:
  - {address: "2001:db8::1", port: 53}
  - {address: 203.0.113.2, port: 0, weight: 1000001}
- vip: 192.0.2.10
  port: 0
  protocol: UDP
"#,
        );
        let errors = set.validate(true).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services[0].port",
                "services[0].backends[0].address",
                "services[0].backends[1].port",
                "services[0].backends[1].weight",
                "services[1].port",
                "services[1].vip",
            ]
        );
    }

    #[test]
    fn the_example_services_file_is_valid() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/agent/services.yaml");
        let set = ServiceSet::from_file(&path, false).unwrap();
        assert_eq!(set.services.len(), 4);
        assert_eq!(set.services[1].reject_weight, 1);
    }

    #[test]
    fn announced_addresses_are_unicast_and_listed_once() {
        let set = parse(
            "announce: [192.0.2.10, \"2001:db8::10\", 0.0.0.0, \"ff02::1\", \"fe80::1\", 255.255.255.255, 127.0.0.1, 192.0.2.10]\n",
        );
        let errors: Vec<String> = set
            .validate(true)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "announce[2]: 0.0.0.0 cannot be announced (not a unicast address)",
                "announce[3]: ff02::1 cannot be announced (not a unicast address)",
                "announce[4]: fe80::1 cannot be announced (link-local: every interface has its own)",
                "announce[5]: 255.255.255.255 cannot be announced (broadcast)",
                "announce[6]: 127.0.0.1 cannot be announced (not a unicast address)",
                "announce[7]: duplicate address 192.0.2.10",
            ]
        );
    }

    #[test]
    fn remote_backends_need_snat() {
        let set = parse(
            "services:\n- vip: 192.0.2.10\n  port: 80\n  protocol: TCP\n  backends:\n  - {address: 203.0.113.2, port: 8080, remote: true}\n",
        );
        let valid = set.validate(true).unwrap();
        assert!(valid.services[0].backends[0].remote);
        let errors = set.validate(false).unwrap_err();
        assert_eq!(errors[0].path, "services[0].backends[0].remote");
        assert!(errors[0].message.contains("--snat never"), "{}", errors[0]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_yaml::from_str::<ServiceSet>(
            "services:\n- vip: 192.0.2.10\n  port: 80\n  protocol: TCP\n  backend: []\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `backend`"), "{err}");
    }
}
