//! Compiles the digest of the workspace's source into the core as `PEFTPIPE_SOURCE_DIGEST`: the
//! build identity that goes into every stage fingerprint (`fingerprint::tool_version`), so a
//! cache made by one build is never restored by another that may compute something else.

include!("source_digest.rs");

fn main() {
    let manifest = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest.join("../..");
    for source in SOURCE_ROOTS {
        // A folder is scanned for changes as a whole (cargo compares every file's mtime).
        println!("cargo:rerun-if-changed={}", root.join(source).display());
    }
    let digest = source_digest(&root).expect("reading the workspace's source");
    println!("cargo:rustc-env=PEFTPIPE_SOURCE_DIGEST={digest}");
}
