//! Address pools for kind: a small block near the top of the `kind` docker network's subnets,
//! where docker (which hands node addresses out from the bottom) will not reach for a long time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, bail};

/// IPv4: a /28 (16 Gateway addresses); IPv6: a /124 (16 as well).
const V4_BITS: u32 = 28;
const V6_BITS: u32 = 124;

/// The pool carved from `subnet` (`ADDR/LEN`): the second block of the pool's size from the top,
/// so that the subnet's last address (the IPv4 broadcast) stays out of it.
pub fn carve(subnet: &str) -> anyhow::Result<String> {
    let (addr, len) = subnet
        .trim()
        .split_once('/')
        .with_context(|| format!("{subnet}: not ADDRESS/PREFIX"))?;
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("{subnet}: bad address"))?;
    let len: u32 = len
        .parse()
        .with_context(|| format!("{subnet}: bad prefix length"))?;
    match addr {
        IpAddr::V4(addr) => {
            // Room for the pool, the block above it and the bottom half for docker.
            if len > V4_BITS - 2 {
                bail!(
                    "{subnet}: too small for a /{V4_BITS} pool (needs /{} or larger)",
                    V4_BITS - 2
                );
            }
            let network = u32::from(addr) & mask32(len);
            let size = 1u32 << (32 - V4_BITS);
            let top = network | !mask32(len);
            let start = top - 2 * size + 1;
            Ok(format!("{}/{V4_BITS}", Ipv4Addr::from(start)))
        }
        IpAddr::V6(addr) => {
            if len > V6_BITS - 2 {
                bail!(
                    "{subnet}: too small for a /{V6_BITS} pool (needs /{} or larger)",
                    V6_BITS - 2
                );
            }
            let network = u128::from(addr) & mask128(len);
            let size = 1u128 << (128 - V6_BITS);
            let top = network | !mask128(len);
            let start = top - 2 * size + 1;
            Ok(format!("{}/{V6_BITS}", Ipv6Addr::from(start)))
        }
    }
}

/// One pool per address family present in `subnets` (whitespace-separated, as
/// `docker network inspect` prints them): the first subnet of each family is used.
pub fn carve_all(subnets: &str) -> anyhow::Result<Vec<String>> {
    let mut v4 = None;
    let mut v6 = None;
    for subnet in subnets.split_whitespace() {
        let slot = if subnet.contains(':') {
            &mut v6
        } else {
            &mut v4
        };
        if slot.is_none() {
            *slot = Some(carve(subnet)?);
        }
    }
    let pools: Vec<String> = v4.into_iter().chain(v6).collect();
    if pools.is_empty() {
        bail!("the kind network has no subnet (`docker network inspect kind`)");
    }
    Ok(pools)
}

fn mask32(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

fn mask128(len: u32) -> u128 {
    u128::MAX.checked_shl(128 - len).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_pool_is_the_second_block_from_the_top() {
        assert_eq!(carve("198.51.100.0/24").unwrap(), "198.51.100.224/28");
        // Host bits in the subnet are ignored; a /26 is the smallest that fits.
        assert_eq!(carve("203.0.113.77/26").unwrap(), "203.0.113.96/28");
        assert_eq!(carve("192.0.2.0/25").unwrap(), "192.0.2.96/28");
        assert!(carve("192.0.2.0/27").is_err());
    }

    #[test]
    fn ipv6_pool_is_a_124_near_the_top() {
        assert_eq!(
            carve("2001:db8:1:2::/64").unwrap(),
            "2001:db8:1:2:ffff:ffff:ffff:ffe0/124"
        );
        assert_eq!(
            carve("2001:db8::/32").unwrap(),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffe0/124"
        );
        assert!(carve("2001:db8::/123").is_err());
    }

    #[test]
    fn one_pool_per_family_from_the_inspect_output() {
        assert_eq!(
            carve_all("198.51.100.0/24 2001:db8:1:2::/64 203.0.113.0/24 ").unwrap(),
            ["198.51.100.224/28", "2001:db8:1:2:ffff:ffff:ffff:ffe0/124"]
        );
        assert_eq!(carve_all("2001:db8:1:2::/64").unwrap().len(), 1);
        assert!(carve_all("").is_err());
        assert!(carve_all("not-a-subnet").is_err());
    }
}
