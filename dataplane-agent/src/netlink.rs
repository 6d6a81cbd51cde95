//! Route netlink requests the agent makes itself (link XDP state, veth peers, TC filters,
//! nf_tables tables): one request, its answer's messages, and attribute walking.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_MULTI: u16 = 2;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
/// struct nlmsghdr.
pub(crate) const HEADER: usize = 16;

fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one request and collects the answer's messages (a dump's until NLMSG_DONE).
pub(crate) fn request(
    protocol: i32,
    kind: u16,
    flags: u16,
    body: &[u8],
) -> io::Result<Vec<Vec<u8>>> {
    let socket = socket(protocol)?;
    let mut message = Vec::with_capacity(HEADER + body.len());
    message.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(body);
    // SAFETY: the buffer is valid for its length; the kernel is the peer.
    if unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut messages = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    // Bounded: a dump of 8192 devices fits in far fewer reads.
    for _ in 0..10_000 {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buffer[..n as usize];
        let mut more = false;
        while rest.len() >= HEADER {
            let len = (u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize)
                .clamp(HEADER, rest.len());
            let kind = u16_at(rest, 4);
            let flags = u16_at(rest, 6);
            match kind {
                NLMSG_DONE => return Ok(messages),
                NLMSG_ERROR => {
                    let code = rest
                        .get(HEADER..HEADER + 4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(0);
                    return if code == 0 {
                        Ok(messages)
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => messages.push(rest[..len].to_vec()),
            }
            more |= flags & NLM_F_MULTI != 0;
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        if !more {
            return Ok(messages);
        }
    }
    Ok(messages)
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// One level of netlink attributes: (type, payload).
pub(crate) fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16_at(b, 0) as usize;
        if len < 4 || len > b.len() {
            return None;
        }
        let item = (u16_at(b, 2) & 0x3fff, &b[4..len]);
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some(item)
    })
}
