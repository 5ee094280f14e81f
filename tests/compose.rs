//! `docker-compose.yml` is valid and has the documented topology. No Docker engine runs here, so the
//! file is validated with `docker-compose config` (Debian's docker-compose, installed by `make setup`)
//! and the same topology is exercised as processes in `tests/nats.rs`.

mod common;

use std::process::Command;

fn compose(file: &std::path::Path) -> std::process::Output {
    Command::new("docker-compose")
        .args(["-f", file.to_str().unwrap(), "config"])
        .env("ONNX_CHAT_MODEL", "Gemma-3n-E2B-it-ONNX/Q4_MIXED")
        .output()
        .expect("docker-compose is needed to validate docker-compose.yml: `make setup` installs it (apt-get install docker-compose)")
}

#[test]
fn compose_file_is_valid_and_has_the_topology() {
    let file = common::root().join("docker-compose.yml");
    let out = compose(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NATS with JetStream on a volume; a front end on 8000; two workers on a read-only shared cache.
    assert!(text.contains("- -js"), "{text}");
    assert!(text.contains("nats-data:/data"), "{text}");
    assert!(text.contains("- frontend\n"), "{text}");
    assert!(text.contains("published: 8000"), "{text}");
    let worker = text.split("\n  worker:").nth(1).expect("a worker service");
    assert!(worker.contains("replicas: 2"), "{worker}");
    assert!(worker.contains("hf-cache:/hf:ro"), "{worker}");
    assert!(worker.contains("HF_HUB_OFFLINE: '1'"), "{worker}");
    assert!(worker.contains("Gemma-3n-E2B-it-ONNX/Q4_MIXED"), "{worker}");
    assert!(
        worker.contains("service_completed_successfully"),
        "{worker}"
    );
    // The image pins the same ONNX Runtime as requirements.txt.
    let dockerfile = std::fs::read_to_string(common::root().join("Dockerfile")).unwrap();
    let reqs = std::fs::read_to_string(common::root().join("requirements.txt")).unwrap();
    let pin = reqs
        .lines()
        .find(|l| l.starts_with("onnxruntime=="))
        .unwrap();
    assert!(dockerfile.contains(pin), "Dockerfile must install {pin}");

    // The validator does reject a broken file (so the check above can fail).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("docker-compose.yml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("replicas: 2", "replicas: two"),
    )
    .unwrap();
    assert!(!compose(&broken).status.success());
}
