//! peftpipe's core: everything a run does before and around the machine learning, with no
//! dependency on candle, arrow, parquet or tokenizers (the compiler enforces it: this crate
//! cannot name them).
//!
//! - [`config`]: the YAML surface, parsed with spans and validated into a `Pipeline`;
//! - [`schema`]: the JSON Schema generated from the config types;
//! - [`dag`]: the stage graph (references, cycles, order, selection);
//! - [`cache`]: the content-addressed object store, lock files and gc;
//! - [`files`]: temporary files and folders that become the user's, with ordinary permissions;
//! - [`fingerprint`]: what is hashed for each stage and why a stage is dirty;
//! - [`exec`]: the plan and the runner, and the `Stage` trait stage kinds implement.
//!
//! What needs the ML or Arrow side comes in through two small interfaces the main `peftpipe`
//! crate implements: [`config::probe::Probe`] (Parquet footers, chat templates, model configs,
//! asked during semantic validation) and [`exec::stage::Stage`] built by an
//! [`exec::StageBuilder`] (the stage kinds themselves). The main crate re-exports these modules
//! under the same paths (`peftpipe::config`, `peftpipe::exec`, …).

pub mod cache;
pub mod config;
pub mod dag;
pub mod exec;
pub mod files;
pub mod fingerprint;
pub mod schema;

/// The workspace's one version, as people name releases.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// This build's identity, `VERSION+DIGEST`: the version and 12 hex digits of blake3 over the
/// source it was built from (`source_digest.rs`: the crates' sources and manifests, the CUDA
/// kernels, the vendored crates, Cargo.lock). It goes into every stage fingerprint, so a cache
/// made by another build (another commit, an edited source, other dependency versions) is never
/// restored as fresh: that build may compute something else.
pub const TOOL_BUILD: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "+",
    env!("PEFTPIPE_SOURCE_DIGEST")
);

#[cfg(test)]
mod build_identity {
    use std::path::Path;

    include!("../source_digest.rs");

    #[test]
    fn the_build_identity_is_the_version_and_the_digest_of_its_source() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let digest = source_digest(&root).unwrap();
        assert_eq!(
            super::TOOL_BUILD,
            format!("{}+{digest}", super::TOOL_VERSION)
        );
    }

    #[test]
    fn every_source_file_and_only_those_change_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let write = |relative: &str, text: &str| {
            let path = dir.path().join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("src/ops/a.rs", "fn a() {}");
        write("kernels/k.cu", "__global__ void k() {}");
        write("Cargo.lock", "version = 4");
        let first = source_digest(dir.path()).unwrap();
        assert_eq!(first.len(), 12);
        write("README.md", "docs do not change what a build computes");
        write("tests/t.rs", "nor do tests");
        assert_eq!(source_digest(dir.path()).unwrap(), first);
        for (file, text) in [
            ("src/ops/a.rs", "fn a() { }"),
            ("kernels/k.cu", "__global__ void k() { }"),
            ("Cargo.lock", "version = 3"),
            ("crates/core/src/new.rs", ""),
        ] {
            let before = source_digest(dir.path()).unwrap();
            write(file, text);
            assert_ne!(source_digest(dir.path()).unwrap(), before, "{file}");
        }
    }
}
