//! Fuzzes the image layer parser: any byte string must be rejected with an error or parsed,
//! never panic, hang or allocate without bound; what parses must re-encode to a layer with
//! the same state and pages. Run: `cd crates/guard/fuzz && cargo +nightly fuzz run image_decode`.
#![no_main]

use std::path::Path;

use guard::image::Layer;
use libfuzzer_sys::fuzz_target;

/// Pages one by one, every process's (encoding may split long runs into several records).
fn pages(l: &Layer) -> Vec<(i32, u64, &[u8])> {
    fn one(pid: i32, runs: &[(u64, Vec<u8>)]) -> Vec<(i32, u64, &[u8])> {
        runs.iter()
            .flat_map(|(a, d)| d.chunks(4096).enumerate().map(move |(i, p)| (pid, a + i as u64 * 4096, p)))
            .collect()
    }
    let mut v = one(1, &l.pages);
    for (pid, runs) in &l.tree_pages {
        v.extend(one(*pid, runs));
    }
    v
}

fuzz_target!(|data: &[u8]| {
    if let Ok(layer) = guard::image::decode(Path::new("fuzz.img"), data) {
        let again = guard::image::encode(&layer);
        let back = guard::image::decode(Path::new("fuzz.img"), &again).expect("re-encoded layer parses");
        assert_eq!((back.seq, back.full, &back.state), (layer.seq, layer.full, &layer.state));
        assert_eq!(pages(&back), pages(&layer));
    }
});
