//! `peftpipe gc [FILE]`: drop cache objects that no lock file references (and run records that
//! point at them, and staging leftovers). The cache is `--cache-dir` / `PEFTPIPE_CACHE_DIR`, else
//! `.peftpipe/cache` next to FILE, else `.peftpipe/cache` in the current directory. Waits for the
//! cache lock like `run` does.

use std::path::PathBuf;

use clap::Args;

use super::{GlobalArgs, EXIT_FAILED, EXIT_OK};
use crate::cache::Cache;
use crate::report;

#[derive(Debug, Args)]
pub struct GcArgs {
    /// A pipeline file whose default cache (`.peftpipe/cache` next to it) is collected.
    pub pipeline: Option<PathBuf>,
    /// Only report what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(global: &GlobalArgs, args: GcArgs) -> u8 {
    let cache_dir = match (&global.cache_dir, &args.pipeline) {
        (Some(dir), _) => dir.clone(),
        (None, Some(file)) => {
            let parent = file
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            crate::cache::default_cache_dir(&parent)
        }
        (None, None) => crate::cache::default_cache_dir(std::path::Path::new(".")),
    };
    if !cache_dir.join("objects").is_dir() {
        report::error(&format!("no peftpipe cache at `{}`", cache_dir.display()));
        return EXIT_FAILED;
    }
    let result = Cache::open(&cache_dir).and_then(|cache| {
        let _lock = cache.lock_exclusive(|| {
            report::write_stderr(&format!(
                "waiting for the cache lock on {} (a run is using the cache)",
                cache_dir.display()
            ))
        })?;
        cache.gc(args.dry_run)
    });
    match result {
        Ok(gc) => {
            if global.json {
                report::json(&gc);
            } else if !global.quiet {
                let verb = if gc.dry_run {
                    "would remove"
                } else {
                    "removed"
                };
                report::write_stderr(&format!(
                    "{verb} {} object(s) ({:.1} MB) and {} run record(s); kept {} object(s) \
                     referenced by {} lock file(s)",
                    gc.objects_removed,
                    gc.bytes_removed as f64 / 1e6,
                    gc.run_records_removed,
                    gc.objects_kept,
                    gc.lock_files
                ));
            }
            EXIT_OK
        }
        Err(error) => {
            report::error(&error.to_string());
            EXIT_FAILED
        }
    }
}
