//! The temporary files and folders peftpipe renames into place as the user's files: cache
//! objects, lock files and run records, published copies, exports, checkpoints, `generate`'s
//! output. `tempfile` creates them owner-only (0600 files, 0700 folders), which a rename keeps;
//! these builders ask for what a plain create gives (0666 / 0777 less the umask), so a cache or
//! an export is as readable as any other file the user writes (a cache shared by a group, a model
//! served by another account). Scratch that never leaves its stage may stay private.

/// A [`tempfile::Builder`] for a file that becomes the user's.
pub fn file_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    with_mode(0o666)
}

/// A [`tempfile::Builder`] for a folder that becomes the user's.
pub fn dir_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    with_mode(0o777)
}

#[cfg_attr(not(unix), allow(unused_variables))]
fn with_mode<'a, 'b>(mode: u32) -> tempfile::Builder<'a, 'b> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    builder
}

/// This process's umask, read from /proc (Linux); `None` where that is not possible.
#[cfg(test)]
pub(crate) fn umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Umask:"))?;
    u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn files_and_folders_get_a_plain_creates_permissions() {
        let Some(umask) = umask() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let file = file_builder().tempfile_in(dir.path()).unwrap();
        let mode = |path: &std::path::Path| path.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(file.path()), 0o666 & !umask);
        let folder = dir_builder().tempdir_in(dir.path()).unwrap();
        assert_eq!(mode(folder.path()), 0o777 & !umask);
    }
}
