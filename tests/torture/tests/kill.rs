//! The kill -9 sample CI runs: children of `layerstore-torture` killed at random moments
//! (the documented command in docs/RELIABILITY.md runs thousands).

#[test]
fn nothing_acknowledged_is_lost_across_kill_points() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_layerstore-torture"))
        .args(["run", "--points", "25", "--seed", "3", "--max-ms", "300"])
        .output()
        .expect("run the torture driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("25 kill points") && stdout.contains("nothing lost"),
        "{stdout}"
    );
}
