//! The safetensors header reader (what `validate` and `inspect` read from model folders) on
//! arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let file = dir.path().join("model.safetensors");
    if std::fs::write(&file, data).is_ok() {
        let _ = peftpipe::models::load::read_safetensors_header(&file);
    }
});
