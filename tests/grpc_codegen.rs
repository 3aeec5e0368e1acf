//! The generated gRPC code of the examples is committed (so the library needs no
//! build script and no protoc); this test regenerates it with the vendored protoc
//! and fails if the committed file is stale. `REGENERATE=1 cargo test --test
//! grpc_codegen` rewrites it.

use std::path::Path;

#[test]
fn committed_grpc_code_matches_the_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("sr-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    // This test binary runs this one test: setting the variable races with nothing.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path().unwrap());
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_protos(
            &[root.join("examples/proto/notes.proto")],
            &[root.join("examples/proto")],
        )
        .unwrap();
    let generated = std::fs::read_to_string(out.join("notes.v1.rs")).unwrap();
    let committed_path = root.join("examples/proto/notes.v1.rs");
    if std::env::var_os("REGENERATE").is_some() {
        std::fs::write(&committed_path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "examples/proto/notes.v1.rs is stale: run REGENERATE=1 cargo test --test grpc_codegen"
    );
}
