#[test]
fn loom_stub() {}
