//! The controller binary run by a test, and the loopback addresses it is given.

use std::{net::SocketAddr, path::PathBuf, process::Child};

/// A child process and its scratch folder: killed, reaped and removed on drop, also when the
/// test fails.
pub struct ChildInDir {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for ChildInDir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback address nobody listens on (yet).
pub fn free_local_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
