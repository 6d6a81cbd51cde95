//! The service set the agent programs, as read from a services file, and its validation.

use std::{collections::BTreeSet, fmt, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

/// Upper bound on backends per service (the Gateway API allows 16 backendRefs, each a Service
/// with possibly many endpoints).
pub const MAX_BACKENDS_PER_SERVICE: usize = 1024;
/// Gateway API weight range.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Announced addresses at most (the size of the pinned announced-addresses map).
pub const MAX_ANNOUNCED: usize = fulgur_common::defaults::MAX_ANNOUNCED as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => fulgur_common::PROTO_TCP,
            Protocol::Udp => fulgur_common::PROTO_UDP,
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
}

fn default_weight() -> u32 {
    1
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

impl ServiceSet {
    /// Reads and validates a YAML (or JSON) services file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let set: ServiceSet = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown.clone(),
            source,
        })?;
        set.validate().map_err(|errors| ConfigError::Invalid {
            path: shown,
            errors,
        })?;
        Ok(set)
    }

    /// Checks everything and reports every problem at once.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            let mut fail =
                |path: String, message: String| errors.push(FieldError { path, message });
            if service.port == 0 {
                fail(at("port"), "must be 1-65535".into());
            }
            if service.vip.is_unspecified() || service.vip.is_multicast() {
                fail(
                    at("vip"),
                    format!("{} cannot be a service address", service.vip),
                );
            }
            if service.reject_weight > MAX_WEIGHT {
                fail(
                    at("rejectWeight"),
                    format!("{} is above {MAX_WEIGHT}", service.reject_weight),
                );
            }
            if !seen.insert((service.vip, service.port, service.protocol)) {
                fail(
                    at("vip"),
                    format!(
                        "duplicate service {} {}:{}",
                        service.protocol, service.vip, service.port
                    ),
                );
            }
            if service.backends.len() > MAX_BACKENDS_PER_SERVICE {
                fail(
                    at("backends"),
                    format!(
                        "{} backends, at most {MAX_BACKENDS_PER_SERVICE} are allowed",
                        service.backends.len()
                    ),
                );
            }
            let mut backends_seen = BTreeSet::new();
            for (j, backend) in service.backends.iter().enumerate() {
                let at = |field: &str| format!("services[{i}].backends[{j}].{field}");
                if backend.address.is_ipv4() != service.vip.is_ipv4() {
                    fail(
                        at("address"),
                        format!(
                            "{} is not in the address family of the service address {}",
                            backend.address, service.vip
                        ),
                    );
                }
                if backend.port == 0 {
                    fail(at("port"), "must be 1-65535".into());
                }
                if backend.weight > MAX_WEIGHT {
                    fail(
                        at("weight"),
                        format!("{} is above {MAX_WEIGHT}", backend.weight),
                    );
                }
                if !backends_seen.insert((backend.address, backend.port)) {
                    fail(
                        at("address"),
                        format!("duplicate backend {}:{}", backend.address, backend.port),
                    );
                }
            }
        }
        errors.extend(announce_errors(&self.announce));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Announced addresses must be unicast addresses a neighbour could ask for, each listed once.
fn announce_errors(addresses: &[IpAddr]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if addresses.len() > MAX_ANNOUNCED {
        errors.push(FieldError {
            path: "announce".into(),
            message: format!(
                "{} addresses, at most {MAX_ANNOUNCED} are allowed",
                addresses.len()
            ),
        });
    }
    let mut seen = BTreeSet::new();
    for (i, address) in addresses.iter().enumerate() {
        let problem = match address {
            a if a.is_unspecified() || a.is_multicast() || a.is_loopback() => {
                Some(format!("{a} cannot be announced (not a unicast address)"))
            }
            IpAddr::V4(a) if a.is_broadcast() => {
                Some(format!("{a} cannot be announced (broadcast)"))
            }
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(format!(
                "{a} cannot be announced (link-local: every interface has its own)"
            )),
            a if !seen.insert(*a) => Some(format!("duplicate address {a}")),
            _ => None,
        };
        if let Some(message) = problem {
            errors.push(FieldError {
                path: format!("announce[{i}]"),
                message,
            });
        }
    }
    errors
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
        assert_eq!(set.validate(), Ok(()));
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
        let errors = set.validate().unwrap_err();
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
        let set = ServiceSet::from_file(&path).unwrap();
        assert_eq!(set.services.len(), 4);
        assert_eq!(set.services[1].reject_weight, 1);
    }

    #[test]
    fn announced_addresses_are_unicast_and_listed_once() {
        let set = parse(
            "announce: [192.0.2.10, \"2001:db8::10\", 0.0.0.0, \"ff02::1\", \"fe80::1\", 255.255.255.255, 127.0.0.1, 192.0.2.10]\n",
        );
        let errors: Vec<String> = set
            .validate()
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
    fn unknown_fields_are_refused() {
        let err = serde_yaml::from_str::<ServiceSet>(
            "services:\n- vip: 192.0.2.10\n  port: 80\n  protocol: TCP\n  backend: []\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `backend`"), "{err}");
    }
}
