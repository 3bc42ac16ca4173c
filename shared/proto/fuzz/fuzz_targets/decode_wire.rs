//! The postcard envelope decoder: never panics, and whatever it accepts survives a round trip.
//!
//! (Accepted bytes need not be canonical: postcard accepts over-long varints. Signatures do not
//! care, because they cover the re-encoded content, not the received bytes.)
#![no_main]

use cascade_proto::{Limits, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode(data, &Limits::default()) {
        let again = decode(&encode(&message), &Limits::default());
        assert_eq!(again.as_ref(), Ok(&message));
    }
});
