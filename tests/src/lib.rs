//! Test support for fulgur's privileged tests and the demo: network namespaces that clean up
//! after themselves, a client/load-balancer/backends topology, echo servers, and packet builders.

pub mod announce;
pub mod conformance;
pub mod corpus;
pub mod echo;
pub mod fake_programmer;
pub mod forward_bench;
pub mod kind_node;
pub mod lab;
pub mod loadgen;
pub mod multinode;
pub mod netns;
pub mod packets;
pub mod topology;

/// Certificates live in the support crate, which the controller's tests use too.
pub use fulgur_testkit::pki;

/// Where the built agent binary is: `FULGUR_AGENT_BIN`, else next to the running test binary's
/// profile folder.
pub fn agent_binary() -> std::path::PathBuf {
    binary("FULGUR_AGENT_BIN", "fulgur-agent")
}

/// Where the built controller binary is: `FULGUR_CONTROLLER_BIN`, else as for the agent.
pub fn controller_binary() -> std::path::PathBuf {
    binary("FULGUR_CONTROLLER_BIN", "fulgur-controller")
}

fn binary(variable: &str, name: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
