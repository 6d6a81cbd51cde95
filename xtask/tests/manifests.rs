//! The manifests as a cluster gets them: the kustomize base and the kind overlay rendered, every
//! object validated against the Kubernetes schemas offline (kubernetes-validate, installed by
//! `cargo xtask setup`), and the properties the deployment depends on checked one by one.

use std::{path::PathBuf, process::Command};

use serde_yaml::Value;
use xtask::{certs, image::VERSION, kind, kustomize, workspace_root};

fn manifests() -> PathBuf {
    workspace_root().join("manifests")
}

fn base() -> Vec<Value> {
    kustomize::render(&manifests().join("deploy")).expect("render the base")
}

fn overlay() -> Vec<Value> {
    kustomize::render(&manifests().join("overlays/kind")).expect("render the kind overlay")
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn is_gateway_api(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("gateway.networking.k8s.io/"))
}

fn is_cert_manager(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("cert-manager.io/"))
}

/// Validates every built-in object with kubernetes-validate in strict mode (unknown fields are
/// errors); CRD kinds are checked by the tests themselves.
fn validate(what: &str, objects: &[Value]) {
    let dir = std::env::temp_dir().join(format!("fulgur-validate-{}-{what}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        if is_gateway_api(object) || is_cert_manager(object) {
            continue;
        }
        let file = dir.join(format!("{i}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(object).unwrap()).unwrap();
        files.push(file);
    }
    assert!(!files.is_empty(), "{what}: nothing to validate");
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (run `cargo xtask setup`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what}: kubernetes-validate failed:\n{text}"
    );
    assert_eq!(
        text.matches(" passed for resource ").count(),
        files.len(),
        "{what}: not every object passed:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_validator_rejects_an_unknown_field() {
    // So that a passing validation means something.
    let mut controller = find(&base(), "Deployment", "fulgur-controller").clone();
    controller["spec"]["replica"] = Value::from(2);
    let dir = std::env::temp_dir().join(format!("fulgur-validate-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(&file, serde_yaml::to_string(&controller).unwrap()).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (run `cargo xtask setup`)");
    assert!(!out.status.success(), "a typo passed validation");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_base_renders_and_validates() {
    let objects = base();
    let ids: Vec<String> = objects.iter().map(kustomize::id).collect();
    for want in [
        "Namespace//fulgur-system",
        "ServiceAccount/fulgur-system/fulgur-controller",
        "ClusterRole//fulgur-controller",
        "DaemonSet/fulgur-system/fulgur-agent",
        "Deployment/fulgur-system/fulgur-controller",
        "GatewayClass//fulgur",
    ] {
        assert!(ids.contains(&want.to_owned()), "{want} not in {ids:?}");
    }
    assert_eq!(
        ids[0], "Namespace//fulgur-system",
        "the namespace comes first"
    );
    validate("base", &objects);
    let class = find(&objects, "GatewayClass", "fulgur");
    assert_eq!(class["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(
        class["spec"]["controllerName"],
        "fulgur.dev/gateway-controller"
    );
}

#[test]
fn the_kind_overlay_sets_image_pull_policy_and_pool_placeholder() {
    let objects = overlay();
    validate("kind overlay", &objects);
    let tag = format!("fulgur:{VERSION}");
    for (kind, name) in [
        ("DaemonSet", "fulgur-agent"),
        ("Deployment", "fulgur-controller"),
    ] {
        for container in kustomize::containers(find(&objects, kind, name)) {
            assert_eq!(container["image"].as_str(), Some(tag.as_str()), "{name}");
            assert_eq!(
                container["imagePullPolicy"].as_str(),
                Some("IfNotPresent"),
                "{name}: a loaded image must not be pulled"
            );
        }
    }
    let controller = find(&objects, "Deployment", "fulgur-controller");
    let container = kustomize::containers(controller)[0];
    assert_eq!(
        strings(&container["args"]),
        [kind::PLACEHOLDER_POOL],
        "the overlay's pool replaces the base's"
    );
    assert!(
        strings(&container["command"]).contains(&"--provider=kubernetes"),
        "the base's flags stay"
    );
    let agent = kustomize::containers(find(&objects, "DaemonSet", "fulgur-agent"))[0];
    let agent_args: Vec<&str> = strings(&agent["command"])
        .into_iter()
        .chain(strings(&agent["args"]))
        .collect();
    assert_eq!(
        agent_args
            .iter()
            .filter(|a| a.starts_with("--iface"))
            .count(),
        1,
        "{agent_args:?}"
    );
    assert!(
        agent_args.contains(&"--iface=eth0"),
        "kind nodes' interface: {agent_args:?}"
    );
    let env = agent["env"].as_sequence().expect("env");
    assert!(
        env.iter()
            .any(|e| e["name"] == "FULGUR_XDP_MODE" && e["value"] == "generic"),
        "kind's veth eth0 needs generic XDP: {env:?}"
    );
    assert!(
        env.iter().any(|e| e["name"] == "POD_IP"),
        "the base's env stays: {env:?}"
    );
}

#[test]
fn xtask_kind_fills_the_pool_in() {
    let pools = [
        "198.51.100.224/28".to_owned(),
        "2001:db8:1:2:ffff:ffff:ffff:ffe0/124".to_owned(),
    ];
    let objects = kind::render_overlay(&pools).unwrap();
    let controller = find(&objects, "Deployment", "fulgur-controller");
    assert_eq!(
        strings(&kustomize::containers(controller)[0]["args"]),
        [
            "--address-pool=198.51.100.224/28",
            "--address-pool=2001:db8:1:2:ffff:ffff:ffff:ffe0/124"
        ]
    );
    let text = kustomize::to_yaml(&objects).unwrap();
    assert!(!text.contains("KIND_ADDRESS_POOL"));
    validate("kind overlay with pools", &objects);
}

/// Our resolver agrees with kustomize itself (kubectl's built-in) where kubectl is installed.
#[test]
fn the_rendering_matches_kubectl_kustomize() {
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        eprintln!("kubectl is not installed: comparison with `kubectl kustomize` skipped");
        return;
    }
    for (dir, ours) in [("deploy", base()), ("overlays/kind", overlay())] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(manifests().join(dir))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut theirs: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let mut ours = ours;
        ours.sort_by_key(kustomize::id);
        theirs.sort_by_key(kustomize::id);
        assert_eq!(ours.len(), theirs.len(), "{dir}");
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(
                a,
                b,
                "{dir}: {} differs from kubectl kustomize",
                kustomize::id(a)
            );
        }
    }
}

#[test]
fn no_manifest_uses_latest_and_every_fulgur_image_is_the_workspace_version() {
    let mut files = Vec::new();
    let mut stack = vec![manifests()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    let mut fulgur_images = 0;
    for file in &files {
        for object in kustomize::read_documents(file).unwrap() {
            for container in kustomize::containers(&object) {
                let image = container["image"].as_str().unwrap_or_default();
                assert!(!image.ends_with(":latest"), "{}: {image}", file.display());
                if kustomize::split_image(image).0 == "fulgur" {
                    fulgur_images += 1;
                    assert_eq!(image, format!("fulgur:{VERSION}"), "{}", file.display());
                }
            }
            if object["kind"] == "Kustomization" {
                for image in object["images"].as_sequence().into_iter().flatten() {
                    assert_eq!(
                        image["newTag"].as_str(),
                        Some(VERSION),
                        "{}",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(fulgur_images >= 3, "agent, controller, uninstall");
}

#[test]
fn the_controller_runs_as_non_root_and_the_agent_as_root_with_two_capabilities() {
    let objects = overlay();
    let controller = find(&objects, "Deployment", "fulgur-controller");
    let pod = &controller["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert_ne!(pod["runAsUser"], 0);
    let agent = find(&objects, "DaemonSet", "fulgur-agent");
    let spec = &agent["spec"]["template"]["spec"];
    assert_ne!(spec["securityContext"]["runAsNonRoot"], true);
    let caps = &kustomize::containers(agent)[0]["securityContext"]["capabilities"];
    assert_eq!(strings(&caps["drop"]), ["ALL"]);
    let added = strings(&caps["add"]);
    assert!(
        added.contains(&"BPF") && added.contains(&"NET_ADMIN"),
        "{added:?}"
    );
}

#[test]
fn the_uninstall_daemonset_detaches_where_the_agent_pins() {
    let objects = kustomize::read_documents(&manifests().join("uninstall/detach.yaml")).unwrap();
    validate("uninstall", &objects);
    let uninstall = find(&objects, "DaemonSet", "fulgur-uninstall");
    let detach = kustomize::containers(uninstall)[0];
    let command = strings(&detach["command"]);
    assert_eq!(command[..2], ["/usr/local/bin/fulgur-agent", "detach"]);
    let agent = find(&base(), "DaemonSet", "fulgur-agent").clone();
    let agent_container = kustomize::containers(&agent)[0];
    let bpffs = strings(&agent_container["command"])
        .into_iter()
        .find(|a| a.starts_with("--bpffs-dir="))
        .expect("the agent's --bpffs-dir")
        .to_owned();
    assert!(command.contains(&bpffs.as_str()), "{command:?} vs {bpffs}");
    // Detaching needs BPF (the pins) and NET_ADMIN (the links), nothing the agent lacks.
    let detach_caps = &detach["securityContext"]["capabilities"];
    let agent_caps = &agent_container["securityContext"]["capabilities"];
    assert_eq!(strings(&detach_caps["drop"]), ["ALL"]);
    let added = strings(&detach_caps["add"]);
    assert!(
        added.contains(&"BPF") && added.contains(&"NET_ADMIN"),
        "{added:?}"
    );
    assert!(
        added
            .iter()
            .all(|c| strings(&agent_caps["add"]).contains(c)),
        "{added:?} vs the agent's {agent_caps:?}"
    );
    assert_eq!(
        detach["securityContext"]["runAsUser"], 0,
        "capabilities need uid 0"
    );
    let spec = &uninstall["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["volumes"][0]["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(spec["tolerations"][0]["operator"], "Exists", "every node");
}

#[test]
fn the_examples_validate_and_the_certificates_land_where_the_workloads_look() {
    let echo = kustomize::read_documents(&manifests().join("examples/kind/echo.yaml")).unwrap();
    validate("kind example", &echo);
    let gateway = find(&echo, "Gateway", "demo");
    assert_eq!(gateway["spec"]["gatewayClassName"], "fulgur");
    assert!(
        gateway["spec"]["addresses"].is_null(),
        "the address comes from the pool"
    );
    for (kind, port) in [("TCPRoute", 80), ("UDPRoute", 5353)] {
        let route = find(&echo, kind, "echo");
        let section = route["spec"]["parentRefs"][0]["sectionName"].clone();
        let listener = gateway["spec"]["listeners"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|l| l["name"] == section)
            .unwrap_or_else(|| panic!("{kind}: no listener {section:?}"));
        assert_eq!(
            listener["port"], port,
            "xtask kind sends {kind} traffic to {port}"
        );
    }

    // Both Secrets, from xtask certs and from cert-manager, are the ones the workloads mount.
    let mounted: Vec<String> = base()
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment")))
        .flat_map(|o| {
            o["spec"]["template"]["spec"]["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(mounted, [certs::AGENT_SECRET, certs::CONTROLLER_SECRET]);
    let dir = manifests().join("examples/cert-manager");
    let mut cert_manager = kustomize::read_documents(&dir.join("issuers.yaml")).unwrap();
    cert_manager.extend(kustomize::read_documents(&dir.join("certificates.yaml")).unwrap());
    let agent = find(&cert_manager, "Certificate", "fulgur-agent");
    assert_eq!(agent["spec"]["secretName"], certs::AGENT_SECRET);
    assert!(strings(&agent["spec"]["dnsNames"]).contains(&certs::AGENT_NAME));
    assert!(strings(&agent["spec"]["usages"]).contains(&"server auth"));
    let controller = find(&cert_manager, "Certificate", "fulgur-controller");
    assert_eq!(controller["spec"]["secretName"], certs::CONTROLLER_SECRET);
    assert!(strings(&controller["spec"]["usages"]).contains(&"client auth"));
    for object in &cert_manager {
        assert_eq!(object["metadata"]["namespace"], certs::NAMESPACE);
    }
    // The CA issuer signs with the CA certificate's Secret.
    assert_eq!(
        find(&cert_manager, "Issuer", "fulgur-ca")["spec"]["ca"]["secretName"],
        find(&cert_manager, "Certificate", "fulgur-ca")["spec"]["secretName"]
    );
}

#[test]
fn xtask_certs_writes_valid_secrets() {
    let dir = std::env::temp_dir().join(format!("fulgur-certs-secrets-{}", std::process::id()));
    let written = certs::write(&dir, &certs::Options::default()).unwrap();
    let secrets = kustomize::read_documents(&written.secrets).unwrap();
    validate("secrets", &secrets);
    for (name, cert) in [
        (certs::AGENT_SECRET, &written.agent_cert),
        (certs::CONTROLLER_SECRET, &written.controller_cert),
    ] {
        let secret = find(&secrets, "Secret", name);
        assert_eq!(secret["metadata"]["namespace"], certs::NAMESPACE);
        assert_eq!(secret["type"], "kubernetes.io/tls");
        let data = &secret["stringData"];
        assert_eq!(
            data["tls.crt"].as_str().unwrap(),
            std::fs::read_to_string(cert).unwrap()
        );
        assert_eq!(
            data["ca.crt"].as_str().unwrap(),
            std::fs::read_to_string(&written.ca).unwrap()
        );
        assert!(
            data["tls.key"]
                .as_str()
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
    }
    use std::os::unix::fs::PermissionsExt as _;
    for key in [
        &written.agent_key,
        &written.controller_key,
        &written.ca_key,
        &written.secrets,
    ] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
