//! Embeds the web console's files (`console/`) in the server: writes `console_assets.rs`, a
//! table of every file's name, content type, `ETag` and bytes, into `OUT_DIR`.

use std::fmt::Write as _;
use std::path::Path;

include!("src/content_type.rs");

fn main() {
    // The manifest folder of this build (read when the script runs: a script built for another
    // checkout of the crate must not list that one's folder).
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("console");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed=src/content_type.rs");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the console's folder {}: {err}", dir.display()));
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert!(
        names.iter().any(|name| name == "index.html"),
        "the console's folder {} has no index.html",
        dir.display()
    );
    names.sort();
    let mut table = String::from("&[\n");
    for name in &names {
        let path = dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        let kind = content_type(name);
        // The file's version for `ETag`: FNV-1a of its bytes.
        let bytes = std::fs::read(&path).expect("the console's file is readable");
        let tag = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let _ = writeln!(
            table,
            "    ({name:?}, {kind:?}, \"\\\"{tag:016x}\\\"\", include_bytes!({:?}) as &[u8]),",
            path.display().to_string()
        );
    }
    table.push(']');
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("console_assets.rs");
    std::fs::write(out, table).expect("OUT_DIR is writable");
}
