//! The topic parser: never panics, and whatever it accepts prints back to the same topic.
#![no_main]

use cascade_proto::topic::DeviceTopic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(topic) = DeviceTopic::parse(text) {
            assert_eq!(topic.to_string(), text);
        }
    }
});
