//! The pipeline loader on arbitrary bytes: the YAML parser with spans, then the whole loader
//! (schema, semantics, probes) on the same bytes as a file. Any outcome but a panic or a hang is
//! fine.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = peftpipe::config::load::parse_yaml(text);
    }
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let file = dir.path().join("pipeline.yaml");
    if std::fs::write(&file, data).is_ok() {
        let _ = peftpipe::config::load::load_pipeline(&file, &[], &peftpipe::probe::StandardProbe);
    }
});
