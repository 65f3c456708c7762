// The digest of the source a peftpipe build is made from: shared by `build.rs` (which compiles
// it into the binary as `PEFTPIPE_SOURCE_DIGEST`) and the test that checks the binary's identity
// is the source's. Plain std, no dependencies beyond blake3: it runs in the build script.

/// The files and folders, relative to the workspace root, whose content decides what a build
/// computes: the main crate's and the core's sources and manifests, the CUDA kernels, the
/// vendored crates and the lock file (a dependency's version changes numerics too).
pub const SOURCE_ROOTS: [&str; 10] = [
    "Cargo.toml",
    "Cargo.lock",
    "build.rs",
    "src",
    "kernels",
    "vendor",
    "crates/core/Cargo.toml",
    "crates/core/build.rs",
    "crates/core/source_digest.rs",
    "crates/core/src",
];

fn collect(
    root: &std::path::Path,
    relative: &std::path::Path,
    files: &mut Vec<std::path::PathBuf>,
) {
    let path = root.join(relative);
    if path.is_file() {
        files.push(relative.to_path_buf());
    } else if let Ok(entries) = std::fs::read_dir(&path) {
        for entry in entries.flatten() {
            collect(root, &relative.join(entry.file_name()), files);
        }
    }
}

/// blake3 over every file under [`SOURCE_ROOTS`] of the workspace at `root` (sorted relative
/// paths, each with its length and content), as 12 hex digits. Missing roots are skipped.
pub fn source_digest(root: &std::path::Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    for source in SOURCE_ROOTS {
        collect(root, std::path::Path::new(source), &mut files);
    }
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for file in &files {
        let bytes = std::fs::read(root.join(file))?;
        let name = file.to_string_lossy().replace('\\', "/");
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().to_hex()[..12].to_string())
}
