//! The Gateway API vocabulary in one place: the group, the kinds this controller reads with the
//! versions both providers accept, which kinds are cluster-scoped, and the route kind ↔
//! listener protocol mapping.

use crate::model::RouteKind;

pub const GROUP: &str = "gateway.networking.k8s.io";
/// The version statuses are written at.
pub const STATUS_API_VERSION: &str = "gateway.networking.k8s.io/v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    GatewayClass,
    Gateway,
    TcpRoute,
    UdpRoute,
    ReferenceGrant,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::GatewayClass,
        Kind::Gateway,
        Kind::TcpRoute,
        Kind::UdpRoute,
        Kind::ReferenceGrant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::GatewayClass => "GatewayClass",
            Kind::Gateway => "Gateway",
            Kind::TcpRoute => "TCPRoute",
            Kind::UdpRoute => "UDPRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The versions read, most preferred first: the Kubernetes provider watches the first one
    /// the cluster serves; a manifest folder may use any. TCPRoute and UDPRoute are `v1` from
    /// Gateway API v1.6 (standard channel), ReferenceGrant from v1.5.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::GatewayClass | Kind::Gateway => &["v1", "v1beta1"],
            Kind::TcpRoute | Kind::UdpRoute => &["v1", "v1alpha2"],
            Kind::ReferenceGrant => &["v1", "v1beta1", "v1alpha2"],
        }
    }

    /// Whether `api_version` (`group/version`) is one this controller reads the kind at.
    pub fn read_at(self, api_version: &str) -> bool {
        api_version
            .strip_prefix(GROUP)
            .and_then(|v| v.strip_prefix('/'))
            .is_some_and(|v| self.versions().contains(&v))
    }

    /// GatewayClasses are cluster-scoped: their statuses carry no namespace.
    pub fn namespaced(self) -> bool {
        self != Kind::GatewayClass
    }

    pub fn route(self) -> Option<RouteKind> {
        match self {
            Kind::TcpRoute => Some(RouteKind::Tcp),
            Kind::UdpRoute => Some(RouteKind::Udp),
            _ => None,
        }
    }
}

impl RouteKind {
    pub fn api_kind(self) -> Kind {
        match self {
            RouteKind::Tcp => Kind::TcpRoute,
            RouteKind::Udp => Kind::UdpRoute,
        }
    }

    /// The listener (and Service port) protocol the route kind attaches to.
    pub fn protocol(self) -> &'static str {
        match self {
            RouteKind::Tcp => "TCP",
            RouteKind::Udp => "UDP",
        }
    }

    /// The route kind a listener of `protocol` takes, if any.
    pub fn for_protocol(protocol: &str) -> Option<RouteKind> {
        match protocol {
            "TCP" => Some(RouteKind::Tcp),
            "UDP" => Some(RouteKind::Udp),
            _ => None,
        }
    }
}

/// Names written as they are spelled in the API.
macro_rules! api_names {
    ($(#[$doc:meta])* $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }
        }
    };
}

api_names!(
    /// Condition types of GatewayClasses, Gateways, listeners and route parents.
    ConditionType {
        Accepted,
        Programmed,
        ResolvedRefs,
        Conflicted,
        // Route parents, implementation-specific, set only when False: some node forwards the
        // route's traffic otherwise than its backendRefs say (see `translate`).
        EveryNodeReachesBackends,
    }
);

api_names!(
    /// Condition reasons this controller sets.
    Reason {
        Accepted,
        Programmed,
        ResolvedRefs,
        NoConflicts,
        // Listeners
        ProtocolConflict,
        UnsupportedProtocol,
        InvalidRouteKinds,
        Invalid,
        // Gateways
        ListenersNotValid,
        UnsupportedAddress,
        AddressNotAssigned,
        AddressNotUsable,
        Pending,
        NoResources,
        // Gateways, implementation-specific: why no node announces an address.
        NoAnnouncer,
        FailingOver,
        // Routes
        NoMatchingParent,
        NotAllowedByListeners,
        BackendNotFound,
        RefNotPermitted,
        InvalidKind,
        // Routes, implementation-specific: nodes that leave backends on other nodes out.
        NoLocalEndpoints,
        LocalEndpointsOnly,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_version_table_for_both_providers() {
        assert!(Kind::TcpRoute.read_at("gateway.networking.k8s.io/v1alpha2"));
        assert!(Kind::ReferenceGrant.read_at("gateway.networking.k8s.io/v1beta1"));
        assert!(!Kind::TcpRoute.read_at("gateway.networking.k8s.io/v1beta1"));
        assert!(!Kind::Gateway.read_at("example.com/v1"));
        assert!(!Kind::Gateway.read_at("gateway.networking.k8s.iov1"));
        assert_eq!(
            Kind::from_name("UDPRoute").and_then(Kind::route),
            Some(RouteKind::Udp)
        );
        assert!(!Kind::GatewayClass.namespaced() && Kind::Gateway.namespaced());
        for kind in Kind::ALL {
            assert_eq!(kind.versions()[0], "v1", "{kind:?} prefers v1");
        }
    }
}
