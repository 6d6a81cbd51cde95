//! Packets built with etherparse, an implementation independent of ours: expected outputs are
//! built from scratch (checksums included) and compared byte for byte.

use std::net::IpAddr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, Ipv6RawExtHeader,
    PacketBuilder, VlanId,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    TcpSyn,
    /// ACK + PSH with payload.
    TcpData,
    TcpRst,
    Udp,
}

/// An Ethernet (+ 802.1Q) + IPv4/IPv6 + TCP/UDP packet.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Raw IPv4 options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// IPv6 only: add an 8-byte Destination Options header.
    pub destination_options: bool,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc2];

impl Pkt {
    pub fn new(kind: Kind, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Self {
        Pkt {
            eth_src: CLIENT_MAC,
            eth_dst: [0x02, 0, 0, 0, 0x01, 0x00],
            vlan: None,
            src: src.0,
            dst: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            ttl: 64,
            options: Vec::new(),
            destination_options: false,
            kind,
            payload: b"fulgur packet test".to_vec(),
        }
    }

    fn protocol(&self) -> IpNumber {
        if self.kind == Kind::Udp {
            IpNumber::UDP
        } else {
            IpNumber::TCP
        }
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut header =
                    Ipv4Header::new(0, self.ttl, self.protocol(), src.octets(), dst.octets())
                        .expect("header");
                header.identification = 0x1234;
                header.dont_fragment = true;
                header.options = self.options[..]
                    .try_into()
                    .expect("options: 4n bytes, at most 40");
                IpHeaders::Ipv4(header, Default::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut extensions = Ipv6Extensions::default();
                let mut next_header = self.protocol();
                if self.destination_options {
                    // PadN option filling the 6 bytes after next-header and length.
                    let options =
                        Ipv6RawExtHeader::new_raw(next_header, &[1, 4, 0, 0, 0, 0]).unwrap();
                    extensions.destination_options = Some(options);
                    next_header = IpNumber::IPV6_DESTINATION_OPTIONS;
                }
                let header = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
                    payload_length: 0,
                    next_header,
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                IpHeaders::Ipv6(header, extensions)
            }
            _ => panic!("mixed address families"),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let ip = self.ip_headers();
        let eth = PacketBuilder::ethernet2(self.eth_src, self.eth_dst);
        let mut out = Vec::new();
        macro_rules! finish {
            ($step:expr) => {
                match self.kind {
                    Kind::TcpSyn => $step
                        .tcp(self.src_port, self.dst_port, 1000, 64240)
                        .syn()
                        .write(&mut out, &self.payload),
                    Kind::TcpData => $step
                        .tcp(self.src_port, self.dst_port, 1001, 502)
                        .ack(777)
                        .psh()
                        .write(&mut out, &self.payload),
                    Kind::TcpRst => $step
                        .tcp(self.src_port, self.dst_port, 1001, 0)
                        .rst()
                        .write(&mut out, &[]),
                    Kind::Udp => $step
                        .udp(self.src_port, self.dst_port)
                        .write(&mut out, &self.payload),
                }
            };
        }
        match self.vlan {
            Some(id) => finish!(
                eth.single_vlan(VlanId::try_new(id).expect("vlan id"))
                    .ip(ip)
            ),
            None => finish!(eth.ip(ip)),
        }
        .expect("writing packet");
        out
    }

    pub fn l3_offset(&self) -> usize {
        14 + if self.vlan.is_some() { 4 } else { 0 }
    }

    /// Offset of the L4 header in the built packet.
    pub fn l4_offset(&self) -> usize {
        let ip_len = match self.src {
            IpAddr::V4(_) => 20 + self.options.len(),
            IpAddr::V6(_) => 40 + if self.destination_options { 8 } else { 0 },
        };
        self.l3_offset() + ip_len
    }

    /// The built packet with its UDP checksum set to 0 ("no checksum").
    pub fn build_without_udp_checksum(&self) -> Vec<u8> {
        assert_eq!(self.kind, Kind::Udp);
        let mut packet = self.build();
        let at = self.l4_offset() + 6;
        packet[at..at + 2].copy_from_slice(&[0, 0]);
        packet
    }
}

/// A hex dump that marks differing bytes, for assertion messages.
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    let mut out = String::new();
    for row in 0..expected.len().max(actual.len()).div_ceil(16) {
        let line = |bytes: &[u8], other: &[u8]| {
            (row * 16..row * 16 + 16)
                .map(|i| match (bytes.get(i), other.get(i)) {
                    (Some(b), Some(o)) if b == o => format!("{b:02x} "),
                    (Some(b), _) => format!("{b:02x}*"),
                    (None, _) => "   ".into(),
                })
                .collect::<String>()
        };
        out.push_str(&format!(
            "{:04x}  expected {}\n      actual   {}\n",
            row * 16,
            line(expected, actual),
            line(actual, expected)
        ));
    }
    out
}
