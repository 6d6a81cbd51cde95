//! The YAML the scenarios write: our own manifests with the upstream object names.

use std::net::Ipv4Addr;

use super::{
    APP_BACKEND_NS, BACKEND_NAMESPACES, CONTROLLER_NAME, GATEWAY_CLASS, INFRA_NS, Proto,
    WEB_BACKEND_NS,
};

/// What stays for the whole suite: the GatewayClass and the three namespaces.
pub fn base() -> String {
    let mut out = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {GATEWAY_CLASS}}}\n\
         spec: {{controllerName: {CONTROLLER_NAME}}}\n"
    );
    for ns in BACKEND_NAMESPACES {
        out += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{kubernetes.io/metadata.name: {ns}, gateway-conformance: {}}}\n",
            match ns {
                INFRA_NS => "infra",
                APP_BACKEND_NS => "backend",
                WEB_BACKEND_NS => "web-backend",
                _ => "other",
            }
        );
    }
    out
}

/// A listener: name, port, protocol, and `allowedRoutes.namespaces.from` when not the default.
#[derive(Clone, Copy)]
pub struct Listener<'a> {
    pub name: &'a str,
    pub port: u16,
    pub protocol: &'a str,
}

pub const fn listener<'a>(name: &'a str, port: u16, protocol: &'a str) -> Listener<'a> {
    Listener {
        name,
        port,
        protocol,
    }
}

/// A Gateway in gateway-conformance-infra at the static address `vip`.
pub fn gateway(name: &str, vip: Ipv4Addr, listeners: &[Listener<'_>]) -> String {
    let mut out = format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {INFRA_NS}}}\n\
         spec:\n  gatewayClassName: {GATEWAY_CLASS}\n  addresses: [{{type: IPAddress, value: {vip}}}]\n  listeners:\n"
    );
    for l in listeners {
        out += &format!(
            "  - name: {}\n    port: {}\n    protocol: {}\n    allowedRoutes: {{namespaces: {{from: Same}}}}\n",
            l.name, l.port, l.protocol
        );
        if l.protocol == "TLS" {
            out += "    hostname: tls.example.com\n    tls: {mode: Passthrough}\n";
        }
    }
    out
}

/// A backendRef: namespace (None: the route's), Service name, port, weight (None: default).
#[derive(Clone, Copy)]
pub struct Backend<'a> {
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub port: u16,
    pub weight: Option<u32>,
}

pub const fn backend(name: &str, port: u16) -> Backend<'_> {
    Backend {
        namespace: None,
        name,
        port,
        weight: None,
    }
}

impl<'a> Backend<'a> {
    pub const fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    pub const fn namespace(mut self, namespace: &'a str) -> Self {
        self.namespace = Some(namespace);
        self
    }
}

/// A parentRef to a Gateway in the route's namespace.
#[derive(Clone, Copy)]
pub struct Parent<'a> {
    pub name: &'a str,
    pub section: Option<&'a str>,
    pub port: Option<u16>,
}

pub const fn parent(name: &str) -> Parent<'_> {
    Parent {
        name,
        section: None,
        port: None,
    }
}

impl<'a> Parent<'a> {
    pub const fn section(mut self, section: &'a str) -> Self {
        self.section = Some(section);
        self
    }

    pub const fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
}

/// A `v1` TCPRoute or UDPRoute in gateway-conformance-infra, with one rule.
pub fn route(
    kind: &str,
    name: &str,
    parents: &[Parent<'_>],
    backends: &[Backend<'_>],
    created: Option<&str>,
) -> String {
    let mut out = format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {INFRA_NS}\n"
    );
    if let Some(created) = created {
        out += &format!("  creationTimestamp: \"{created}\"\n");
    }
    out += "spec:\n  parentRefs:\n";
    for p in parents {
        out += &format!("  - name: {}\n", p.name);
        if let Some(section) = p.section {
            out += &format!("    sectionName: {section}\n");
        }
        if let Some(port) = p.port {
            out += &format!("    port: {port}\n");
        }
    }
    out += "  rules:\n  - backendRefs:\n";
    for b in backends {
        out += &format!("    - name: {}\n      port: {}\n", b.name, b.port);
        if let Some(ns) = b.namespace {
            out += &format!("      namespace: {ns}\n");
        }
        if let Some(w) = b.weight {
            out += &format!("      weight: {w}\n");
        }
    }
    out
}

/// A Service and its EndpointSlice: `port` to `target` on the pods at `addrs`, all ready.
pub fn service(
    namespace: &str,
    name: &str,
    proto: Proto,
    port: u16,
    target: u16,
    addrs: &[Ipv4Addr],
) -> String {
    let protocol = match proto {
        Proto::Tcp => "TCP",
        Proto::Udp => "UDP",
    };
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: main, port: {port}, protocol: {protocol}, targetPort: {target}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-abcde, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: main, port: {target}, protocol: {protocol}}}]\nendpoints:\n"
    );
    if addrs.is_empty() {
        out += "  []\n";
    }
    for a in addrs {
        out += &format!(
            "- addresses: [{a}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n"
        );
    }
    out
}

/// A ReferenceGrant in `namespace` letting `from_kind`s in gateway-conformance-infra reference
/// Services there.
pub fn reference_grant(name: &str, namespace: &str, from_kind: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  from:\n  - {{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {INFRA_NS}}}\n  to:\n  - {{group: \"\", kind: Service}}\n"
    )
}
