//! Packets built with etherparse, an implementation independent of ours: expected outputs are
//! built from scratch (checksums included) and compared byte for byte.

use std::net::Ipv4Addr;

use etherparse::{IpHeaders, IpNumber, Ipv4Header, PacketBuilder, VlanId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    TcpSyn,
    TcpData,
    Udp,
}

/// An Ethernet + IPv4 + TCP/UDP packet.
#[derive(Clone, Debug)]
pub struct V4 {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ttl: u8,
    /// Raw IPv4 options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl V4 {
    pub fn new(kind: Kind, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        V4 {
            eth_src: [0x02, 0, 0, 0, 0, 0xc2],
            eth_dst: [0x02, 0, 0, 0, 0x01, 0x00],
            vlan: None,
            src: src.0,
            dst: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            ttl: 64,
            options: Vec::new(),
            kind,
            payload: b"fulgur packet test".to_vec(),
        }
    }

    fn ip_header(&self) -> Ipv4Header {
        let protocol = if self.kind == Kind::Udp {
            IpNumber::UDP
        } else {
            IpNumber::TCP
        };
        let mut header =
            Ipv4Header::new(0, self.ttl, protocol, self.src.octets(), self.dst.octets())
                .expect("header");
        header.identification = 0x1234;
        header.dont_fragment = true;
        header.options = self.options[..]
            .try_into()
            .expect("options are a multiple of 4, at most 40");
        header
    }

    pub fn build(&self) -> Vec<u8> {
        let ip = IpHeaders::Ipv4(self.ip_header(), Default::default());
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

    /// Offset of the L4 header in the built packet.
    pub fn l4_offset(&self) -> usize {
        14 + if self.vlan.is_some() { 4 } else { 0 } + 20 + self.options.len()
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
