//! The Gateway API v1.6.1 L4 conformance suite (`cargo xtask conformance`) under `cargo test`:
//! all 17 tests in generic XDP mode through the same library code as the runner, the report it
//! writes checked against upstream's required fields, and the README's table checked against the
//! scenario definitions. (`cargo xtask conformance` runs native mode by default.)

use fulgur_agent::dataplane::XdpAttachMode;
use fulgur_tests::conformance::{self, Options, report};

#[test]
fn the_l4_conformance_suite_passes_and_its_report_validates() {
    let run = conformance::run(&Options {
        only: vec![],
        mode: XdpAttachMode::Generic,
    })
    .expect("the conformance topology");
    let table = conformance::table(&run);
    println!("{table}");
    for o in &run.outcomes {
        if let Some(error) = &o.error {
            println!("{} FAILED:\n{error}\n", o.name);
        }
    }
    assert_eq!(run.outcomes.len(), 17);
    assert!(run.outcomes.iter().all(|o| o.passed()), "{table}");

    let path = std::env::temp_dir().join(format!("fulgur-conformance-{}.yaml", std::process::id()));
    report::write(&report::build(&run), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    report::validate(&text).unwrap();
    assert!(
        text.starts_with(report::HEADER),
        "the header comment says who made it"
    );
    let parsed: report::ConformanceReport = serde_yaml::from_str(&text).unwrap();
    assert_eq!(parsed.profiles.len(), 2);
    for p in &parsed.profiles {
        assert_eq!(p.core.result, "success", "{}", p.name);
        assert_eq!(p.core.statistics.failed, 0);
        assert_eq!(p.core.statistics.skipped, 0);
    }
    assert_eq!(parsed.profiles[0].core.statistics.passed, 8);
    assert_eq!(parsed.profiles[1].core.statistics.passed, 9);
    assert_eq!(parsed.succeeded_provisional_tests.len(), 16);
    assert!(
        !parsed
            .succeeded_provisional_tests
            .iter()
            .any(|t| t == "TCPRouteMultipleRoutesAttachment")
    );
}

#[test]
fn a_report_with_failures_and_skips_validates_and_says_so() {
    use std::time::Duration;
    let outcome = |name: &'static str, profile, error: Option<&str>| conformance::Outcome {
        name,
        profile,
        provisional: true,
        error: error.map(str::to_owned),
        duration: Duration::from_millis(5),
    };
    let run = conformance::Run {
        outcomes: vec![
            outcome(
                "TCPRouteWeightedRouting",
                conformance::Profile::Tcp,
                Some("uneven"),
            ),
            outcome("UDPRoute", conformance::Profile::Udp, None),
        ],
        setup: Duration::ZERO,
        total: Duration::ZERO,
        mode: XdpAttachMode::Generic,
    };
    let report = report::build(&run);
    let text = report::render(&report);
    report::validate(&text).unwrap();
    let tcp = &report.profiles[0];
    assert_eq!(tcp.core.result, "failure");
    assert_eq!(tcp.core.failed_tests, ["TCPRouteWeightedRouting"]);
    assert_eq!(tcp.core.statistics.skipped, 7);
    let udp = &report.profiles[1];
    assert_eq!(udp.core.result, "partial");
    assert_eq!(udp.core.statistics.passed, 1);
    assert_eq!(report.succeeded_provisional_tests, ["UDPRoute"]);
    // What the validator refuses.
    for (from, to) in [
        ("kind: ConformanceReport", "kind: Other"),
        ("result: failure", "result: maybe"),
        ("Passed: 0", "Passed: none"),
    ] {
        assert!(text.contains(from), "{from}");
        assert!(
            report::validate(&text.replacen(from, to, 1)).is_err(),
            "{to}"
        );
    }
}

#[test]
fn the_readme_table_is_the_scenario_list() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let table = conformance::markdown();
    assert!(
        readme.contains(&table),
        "README.md's conformance table differs from the scenarios; replace it with the output of \
         `cargo run -p fulgur-tests --bin fulgur-conformance -- --markdown`:\n{table}"
    );
    assert_eq!(conformance::scenarios::all().len(), 17);
    let provisional = conformance::scenarios::all()
        .iter()
        .filter(|s| !s.provisional)
        .map(|s| s.name)
        .collect::<Vec<_>>();
    assert_eq!(provisional, ["TCPRouteMultipleRoutesAttachment"]);
}
