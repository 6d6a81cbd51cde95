//! The ConformanceReport (`gateway.networking.k8s.io/v1`), in the shape upstream's suite writes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{GATEWAY_API_VERSION, Outcome, Profile, Run};

pub const ORGANIZATION: &str = "fulgur";
pub const PROJECT: &str = "fulgur";
pub const URL: &str = "https://fulgur.dev";
pub const CONTACT: &[&str] = &["fulgur maintainers"];
pub const CHANNEL: &str = "standard";
pub const MODE: &str = "standalone";

/// Extended Gateway features of the two profiles. One is claimed only when a test of this
/// run exercised it; none of the 17 L4 tests does, so today all are listed as unsupported.
pub const EXTENDED_FEATURES: &[&str] = &[
    "GatewayAddressEmpty",
    "GatewayPort8080",
    "GatewayStaticAddresses",
];

/// The header comment: who made the report.
pub const HEADER: &str = "# Produced by fulgur's standalone conformance runner (`cargo xtask conformance`,\n\
# tests/src/conformance), which reimplements the Gateway API v1.6.1 GATEWAY-TCP and GATEWAY-UDP\n\
# tests with real traffic through fulgur-controller (--provider file) and fulgur-agent.\n\
# It was NOT produced by the upstream Go conformance suite.\n";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConformanceReport {
    pub api_version: String,
    pub kind: String,
    pub date: String,
    #[serde(rename = "gatewayAPIVersion")]
    pub gateway_api_version: String,
    #[serde(rename = "gatewayAPIChannel")]
    pub gateway_api_channel: String,
    pub mode: String,
    pub implementation: Implementation,
    pub profiles: Vec<ProfileReport>,
    pub succeeded_provisional_tests: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Implementation {
    pub organization: String,
    pub project: String,
    pub url: String,
    pub version: String,
    pub contact: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ProfileReport {
    pub name: String,
    pub summary: String,
    pub core: Block,
    pub extended: Block,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub result: String,
    pub statistics: Statistics,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_tests: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_tests: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsupported_features: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Statistics {
    #[serde(rename = "Passed")]
    pub passed: u32,
    #[serde(rename = "Skipped")]
    pub skipped: u32,
    #[serde(rename = "Failed")]
    pub failed: u32,
}

fn block(outcomes: &[&Outcome], skipped: Vec<String>) -> Block {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.name.to_owned())
        .collect();
    let passed = outcomes.iter().filter(|o| o.passed()).count() as u32;
    // upstream: failure when any failed, partial when any skipped, else success.
    let result = if !failed.is_empty() {
        "failure"
    } else if !skipped.is_empty() {
        "partial"
    } else {
        "success"
    };
    Block {
        result: result.into(),
        statistics: Statistics {
            passed,
            skipped: skipped.len() as u32,
            failed: failed.len() as u32,
        },
        skipped_tests: skipped,
        failed_tests: failed,
        supported_features: None,
        unsupported_features: None,
    }
}

/// The report of `run`; tests of the profiles that were not selected are skipped.
pub fn build(run: &Run) -> ConformanceReport {
    let mut profiles = Vec::new();
    for profile in [Profile::Tcp, Profile::Udp] {
        let outcomes: Vec<&Outcome> = run
            .outcomes
            .iter()
            .filter(|o| o.profile == profile)
            .collect();
        let skipped: Vec<String> = super::scenarios::all()
            .iter()
            .filter(|s| s.profile == profile && !outcomes.iter().any(|o| o.name == s.name))
            .map(|s| s.name.to_owned())
            .collect();
        let core = block(&outcomes, skipped);
        let mut extended = block(&[], vec![]);
        extended.supported_features = Some(vec![]);
        extended.unsupported_features =
            Some(EXTENDED_FEATURES.iter().map(|f| f.to_string()).collect());
        let summary = format!(
            "Core tests {} with {} test passes. Extended tests {} with 0 test passes.",
            match core.result.as_str() {
                "success" => "succeeded",
                "partial" => "partially succeeded",
                _ => "failed",
            },
            core.statistics.passed,
            "succeeded",
        );
        profiles.push(ProfileReport {
            name: profile.name().into(),
            summary,
            core,
            extended,
        });
    }
    ConformanceReport {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "ConformanceReport".into(),
        date: fulgur_controller::status::now(),
        gateway_api_version: GATEWAY_API_VERSION.into(),
        gateway_api_channel: CHANNEL.into(),
        mode: MODE.into(),
        implementation: Implementation {
            organization: ORGANIZATION.into(),
            project: PROJECT.into(),
            url: URL.into(),
            version: format!("v{}", env!("CARGO_PKG_VERSION")),
            contact: CONTACT.iter().map(|c| c.to_string()).collect(),
        },
        profiles,
        succeeded_provisional_tests: run
            .outcomes
            .iter()
            .filter(|o| o.provisional && o.passed())
            .map(|o| o.name.to_owned())
            .collect(),
    }
}

pub fn render(report: &ConformanceReport) -> String {
    HEADER.to_owned() + &serde_yaml::to_string(report).expect("the report serializes")
}

pub fn write(report: &ConformanceReport, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, render(report))?;
    Ok(())
}

/// The default file name upstream asks for: `<channel>-<version>-<mode>-report.yaml`.
pub fn file_name() -> String {
    format!("{CHANNEL}-{GATEWAY_API_VERSION}-{MODE}-report.yaml")
}

/// Checks `text` against the required fields and types of upstream's ConformanceReport schema
/// (apis/v1 ConformanceReport; `pkg/apis` confv1): what `omitempty` does not cover must be there.
pub fn validate(text: &str) -> anyhow::Result<()> {
    use anyhow::{Context as _, ensure};
    use serde_yaml::Value;
    let v: Value = serde_yaml::from_str(text).context("the report is not YAML")?;
    let str_at = |v: &Value, key: &str| -> anyhow::Result<String> {
        v.get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{key}: a string is required"))
    };
    ensure!(
        str_at(&v, "apiVersion")? == "gateway.networking.k8s.io/v1",
        "apiVersion"
    );
    ensure!(str_at(&v, "kind")? == "ConformanceReport", "kind");
    let date = str_at(&v, "date")?;
    let b = date.as_bytes();
    ensure!(
        b.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && (date.ends_with('Z') || date[19..].contains(['+', '-'])),
        "date {date:?} is not RFC 3339"
    );
    ensure!(
        str_at(&v, "gatewayAPIVersion")?.starts_with('v'),
        "gatewayAPIVersion"
    );
    ensure!(
        ["standard", "experimental"].contains(&str_at(&v, "gatewayAPIChannel")?.as_str()),
        "gatewayAPIChannel"
    );
    str_at(&v, "mode")?;
    let imp = v
        .get("implementation")
        .context("implementation is required")?;
    for key in ["organization", "project", "url", "version"] {
        ensure!(
            !str_at(imp, key)?.is_empty(),
            "implementation.{key} is empty"
        );
    }
    let contact = imp
        .get("contact")
        .and_then(Value::as_sequence)
        .context("implementation.contact: a list is required")?;
    ensure!(
        contact.iter().all(|c| c.as_str().is_some()),
        "implementation.contact: strings"
    );
    let profiles = v
        .get("profiles")
        .and_then(Value::as_sequence)
        .context("profiles: a list is required")?;
    ensure!(!profiles.is_empty(), "profiles is empty");
    for p in profiles {
        let name = str_at(p, "name")?;
        for block_name in ["core", "extended"] {
            let Some(block) = p.get(block_name) else {
                ensure!(block_name == "extended", "{name}: core is required");
                continue;
            };
            let result = str_at(block, "result")?;
            ensure!(
                ["success", "partial", "failure"].contains(&result.as_str()),
                "{name}.{block_name}.result {result:?}"
            );
            let stats = block
                .get("statistics")
                .with_context(|| format!("{name}.{block_name}.statistics is required"))?;
            for key in ["Passed", "Skipped", "Failed"] {
                ensure!(
                    stats.get(key).and_then(Value::as_u64).is_some(),
                    "{name}.{block_name}.statistics.{key}: an integer is required"
                );
            }
            for key in [
                "skippedTests",
                "failedTests",
                "supportedFeatures",
                "unsupportedFeatures",
            ] {
                if let Some(list) = block.get(key) {
                    ensure!(
                        list.as_sequence()
                            .is_some_and(|l| l.iter().all(|x| x.as_str().is_some())),
                        "{name}.{block_name}.{key}: a list of strings"
                    );
                }
            }
            let failed = stats["Failed"].as_u64().unwrap_or(0) as usize;
            let listed = block
                .get("failedTests")
                .and_then(Value::as_sequence)
                .map_or(0, |l| l.len());
            ensure!(
                failed == listed,
                "{name}.{block_name}: Failed {failed}, failedTests {listed}"
            );
        }
    }
    if let Some(list) = v.get("succeededProvisionalTests") {
        ensure!(
            list.as_sequence()
                .is_some_and(|l| l.iter().all(|x| x.as_str().is_some())),
            "succeededProvisionalTests: a list of strings"
        );
    }
    Ok(())
}
