//! Keeps docs/protocol.md honest: every JSON block decodes, every kind has one, and the signed
//! examples carry real signatures.

use std::collections::BTreeSet;

use cascade_proto::examples::example_signing_key;
use cascade_proto::signing::Keyring;
use cascade_proto::{Limits, Message, MessageKind, decode_json};

fn json_blocks(markdown: &str) -> Vec<&str> {
    markdown
        .split("```json\n")
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .collect()
}

#[test]
fn protocol_doc_examples_decode_and_cover_every_kind() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md is readable");
    let mut keys = Keyring::new();
    keys.add(example_signing_key().verifying_key());

    let mut seen = BTreeSet::new();
    for block in json_blocks(&doc) {
        let message = decode_json(block.as_bytes(), &Limits::default()).unwrap_or_else(|e| {
            panic!("a JSON block in docs/protocol.md does not decode: {e}\n{block}")
        });
        match &message {
            Message::OtaManifest(signed) => assert!(signed.verify(&keys).is_ok()),
            Message::PolicyUpdate(signed) => assert!(signed.verify(&keys).is_ok()),
            _ => {}
        }
        seen.insert(message.kind());
    }
    let missing: Vec<_> = MessageKind::ALL
        .iter()
        .filter(|k| !seen.contains(k))
        .map(|k| k.name())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/protocol.md lacks examples of {missing:?}"
    );
}
