//! The deployment files agree with the server: the Kubernetes ConfigMap's encore.toml is a valid
//! configuration whose drain fits the grace period, the probes and the drain hook are there,
//! every ENCORE_* variable the image, the manifests and the docs name is one the server reads,
//! and the dashboard, the alerts and the docs name only families the server exports (and the
//! docs all of them).

use std::collections::BTreeSet;
use std::path::Path;

use encore::config::ServerConfig;
use encore::metrics::{FAMILIES, PROCESS_FAMILIES};

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every word of `text` that starts with `prefix` and goes on in `[a-z0-9_]` (or `[A-Z0-9_]`).
fn words(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let name = &tail[prefix.len()..];
        let end = prefix.len() + name.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(name.len());
        let before = rest[..at].chars().next_back();
        // A bare prefix (`ENCORE_*` in prose) names nothing.
        if end > prefix.len() && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            found.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    found
}

/// The literal block `encore.toml: |` of the ConfigMap, unindented.
fn configmap_toml() -> String {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let (_, block) = yaml.split_once("encore.toml: |\n").expect("an encore.toml block");
    block.lines().map(|line| line.strip_prefix("    ").unwrap_or(line)).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_kubernetes_configuration_is_valid_and_its_drain_fits_the_grace_period() {
    let file = super::support::temp_dir("deploy").join("encore.toml");
    std::fs::write(&file, configmap_toml()).unwrap();
    let mut config = ServerConfig::from_file(&file).expect("the ConfigMap's encore.toml parses");
    // The Secret supplies the project (ENCORE_FIREBASE_PROJECT_ID).
    config.auth.project_id = Some("my-project".into());
    config.validate().expect("and is valid with the Secret's project");
    assert_eq!(config.auth.mode, encore::auth::AuthMode::Firebase);
    assert!(config.server.tls_cert.is_some(), "a real certificate");

    let deployment = read("deploy/kubernetes/deployment.yaml");
    let grace: u64 = deployment
        .lines()
        .find_map(|line| line.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= config.server.drain_timeout_s + 15,
        "grace {grace} s < drain {} s + the close",
        config.server.drain_timeout_s
    );
    for needed in [
        "hostNetwork: true",
        "path: /readyz",
        "path: /healthz",
        "scheme: HTTPS",
        "kill -TERM 1",
        "runAsNonRoot: true",
        "runAsUser: 10001",
        "secretName: encore-tls",
        "name: encore-firebase",
        "value: /etc/encore/encore.toml",
    ] {
        assert!(deployment.contains(needed), "deployment.yaml lacks {needed:?}");
    }
    let port = config.server.listen.port().to_string();
    assert!(deployment.contains(&format!("containerPort: {port}")) && deployment.contains(&format!("port: {port}")));
    let metrics = config.metrics.listen.expect("metrics on").port().to_string();
    assert!(deployment.contains(&format!("containerPort: {metrics}")));
    assert!(read("deploy/kubernetes/service.yaml").contains(&format!("prometheus.io/port: \"{metrics}\"")));
}

#[test]
fn every_encore_variable_named_for_operators_is_read_by_the_server() {
    let mut code = String::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                code.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let read_by_code = words(&code, "\"ENCORE_").into_iter().map(|w| w[1..].to_owned()).collect::<BTreeSet<_>>();
    for file in [
        "Dockerfile",
        "deploy/compose.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/configmap.yaml",
        "docs/configuration.md",
        "docs/deployment.md",
        "docs/operations.md",
    ] {
        for variable in words(&read(file), "ENCORE_") {
            assert!(read_by_code.contains(&variable), "{file} names {variable}, which the server does not read");
        }
    }
}

#[test]
fn the_dashboard_alerts_and_docs_name_only_exported_families() {
    let families: BTreeSet<&str> = FAMILIES.iter().chain(PROCESS_FAMILIES).map(|f| f.name).collect();
    let exported = |name: &str| {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        families.contains(name) || families.contains(base)
    };
    let dashboard = read("deploy/grafana/encore-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    let mut titles: Vec<String> = panels.iter().filter_map(|p| p["title"].as_str().map(str::to_lowercase)).collect();
    titles.sort();
    for wanted in ["rooms", "peers", "packets", "loss", "tick", "buffer fill", "routes by reason"] {
        assert!(titles.iter().any(|t| t.contains(wanted)), "no {wanted:?} panel in {titles:?}");
    }
    let mut named = 0;
    for (file, text) in [("dashboard", dashboard.as_str()), ("alerts", &read("deploy/prometheus-rules.yml"))] {
        for prefix in ["encore_", "process_"] {
            for name in words(text, prefix) {
                assert!(exported(&name), "the {file} names {name}, which the server does not export");
                named += 1;
            }
        }
    }
    assert!(named > 30);
    let docs = read("docs/operations.md");
    for family in &families {
        assert!(docs.contains(&format!("`{family}`")), "docs/operations.md does not list {family}");
    }
    for name in words(&docs, "encore_") {
        assert!(exported(&name), "docs/operations.md names {name}, which the server does not export");
    }
}
