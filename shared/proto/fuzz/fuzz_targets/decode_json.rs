//! The JSON envelope decoder: never panics, and whatever it accepts round-trips through JSON.
#![no_main]

use cascade_proto::{Limits, decode_json, encode_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_json(data, &Limits::default()) {
        let again = decode_json(encode_json(&message).as_bytes(), &Limits::default());
        assert_eq!(again.as_ref(), Ok(&message));
    }
});
