//! Fuzzes the image layer parser: any byte string must be rejected with an error or parsed,
//! never panic, hang or allocate without bound; what parses must re-encode to a layer with
//! the same state and pages. Run: `cd crates/guard/fuzz && cargo +nightly fuzz run image_decode`.
#![no_main]

use std::path::Path;

use guard::image::Layer;
use libfuzzer_sys::fuzz_target;

/// Pages one by one (encoding may split long runs into several records).
fn pages(l: &Layer) -> Vec<(u64, &[u8])> {
    l.pages
        .iter()
        .flat_map(|(a, d)| d.chunks(4096).enumerate().map(move |(i, p)| (a + i as u64 * 4096, p)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(layer) = guard::image::decode(Path::new("fuzz.img"), data) {
        let again = guard::image::encode(&layer);
        let back = guard::image::decode(Path::new("fuzz.img"), &again).expect("re-encoded layer parses");
        assert_eq!((back.seq, back.full, &back.state), (layer.seq, layer.full, &layer.state));
        assert_eq!(pages(&back), pages(&layer));
    }
});
