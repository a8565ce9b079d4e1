//! The README's main command keeps working: `wnsgate demo` on a small fleet.

#[test]
fn demo_runs_the_whole_story() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .args(["demo", "--devices", "3000"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("registered 3000 devices durably"),
        "{stdout}"
    );
    assert!(stdout.contains("woke 3000 devices through WNS"), "{stdout}");
    assert!(
        stdout.contains(
            "the simulator saw 3000 pushes to 3000 distinct channels (at most 1 per channel)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("\"state_reason\": \"wns410\""), "{stdout}");
    assert!(stdout.contains("ready again after"), "{stdout}");
}
