//! Test support for fulgur's privileged tests and the demo: network namespaces that clean up
//! after themselves, a client/load-balancer/backends topology, echo servers, and packet builders.

pub mod corpus;
pub mod echo;
pub mod fake_agent;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod pki;
pub mod topology;

/// Where the built agent binary is: `FULGUR_AGENT_BIN`, else next to the running test binary's
/// profile folder.
pub fn agent_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FULGUR_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("fulgur-agent")
}
