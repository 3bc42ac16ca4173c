//! ed25519 signatures over a canonical byte form, with key ids so fleet keys can rotate.
//!
//! The canonical form of a body is `DOMAIN || 0x00 || postcard(body)`. postcard is deterministic
//! for our types (no maps, fixed field order, floats as raw bits), and the domain string keeps a
//! signature over one kind of body from being replayed as another. A [`Signed`] value names the
//! key that signed it by [`KeyId`]; a device pins a [`Keyring`] of fleet public keys and accepts a
//! body signed by any of them, so a new key can be added before the old one is retired.

use alloc::vec::Vec;
use core::fmt;

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use serde_with::serde_as;
use sha2::{Digest, Sha256};

use crate::bytes::HexBytes;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// A body that can be signed. `DOMAIN` separates signatures over different kinds of body.
pub trait Signable: Serialize {
    /// Domain-separation string, e.g. `cascade/v1/ota-manifest`.
    const DOMAIN: &'static str;
}

/// The first 8 bytes of SHA-256 over a public key: names the key in signed messages.
#[serde_as]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(#[serde_as(as = "HexBytes")] pub [u8; 8]);

impl KeyId {
    /// The id of a public key.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A body with the signature that vouches for it.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    /// The signed content. Do not act on it before [`Signed::verify`] succeeds.
    pub content: T,
    /// Which key signed it.
    pub key_id: KeyId,
    /// ed25519 signature over the canonical form of `content`. Hex in JSON.
    #[serde_as(as = "HexBytes")]
    pub signature: [u8; 64],
}

/// The bytes a signature covers: `DOMAIN || 0x00 || postcard(body)`.
pub fn canonical_bytes<T: Signable>(body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(T::DOMAIN.len() + 64);
    out.extend_from_slice(T::DOMAIN.as_bytes());
    out.push(0);
    // postcard fails only on sequences of unknown length, which no Signable type contains:
    // a failure here is a programming error in a new Signable type, caught by its first test.
    postcard::to_extend(body, out).expect("Signable types serialize infallibly")
}

impl<T: Signable> Signed<T> {
    /// Signs `content` with `key`.
    pub fn sign(content: T, key: &SigningKey) -> Self {
        let signature = key.sign(&canonical_bytes(&content)).to_bytes();
        Signed {
            key_id: KeyId::of(&key.verifying_key()),
            content,
            signature,
        }
    }

    /// Checks the signature against the pinned keys and returns the content if it holds.
    pub fn verify(&self, keys: &Keyring) -> Result<&T, SignatureError> {
        let key = keys
            .get(&self.key_id)
            .ok_or(SignatureError::UnknownKey(self.key_id))?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify_strict(&canonical_bytes(&self.content), &signature)
            .map_err(|_| SignatureError::BadSignature(self.key_id))?;
        Ok(&self.content)
    }
}

/// Why a signed body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Signed by a key this device does not trust.
    #[error(
        "signed by key {0}, which is not among the pinned fleet keys; add its public key to the agent's trusted keys if it is legitimate"
    )]
    UnknownKey(KeyId),
    /// The signature does not match the body: tampered, or signed over something else.
    #[error(
        "signature by key {0} does not match the content: the message was altered or is forged"
    )]
    BadSignature(KeyId),
    /// A configured public key is not a valid ed25519 point.
    #[error("a pinned public key is not a valid ed25519 public key")]
    InvalidPublicKey,
}

/// The fleet public keys a device trusts.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<(KeyId, VerifyingKey)>,
}

impl Keyring {
    /// An empty keyring (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` as well; returns its id.
    pub fn add(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        if self.get(&id).is_none() {
            self.keys.push((id, key));
        }
        id
    }

    /// Trusts the raw 32-byte public key `bytes` as well.
    pub fn add_bytes(&mut self, bytes: &[u8; 32]) -> Result<KeyId, SignatureError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| SignatureError::InvalidPublicKey)?;
        Ok(self.add(key))
    }

    /// The key with this id, if trusted.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    /// Ids of the trusted keys.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[derive(Debug, Serialize)]
    struct Note(String);
    impl Signable for Note {
        const DOMAIN: &'static str = "cascade/test/note";
    }

    #[derive(Serialize)]
    struct OtherNote(String);
    impl Signable for OtherNote {
        const DOMAIN: &'static str = "cascade/test/other";
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn ring(keys: &[&SigningKey]) -> Keyring {
        let mut ring = Keyring::new();
        for k in keys {
            ring.add(k.verifying_key());
        }
        ring
    }

    #[test]
    fn verifies_with_the_signing_key() {
        let k = key(1);
        let signed = Signed::sign(Note("hello".into()), &k);
        assert_eq!(signed.verify(&ring(&[&k])).unwrap().0, "hello");
    }

    #[test]
    fn rejects_a_tampered_body() {
        let k = key(1);
        let mut signed = Signed::sign(Note("hello".into()), &k);
        signed.content.0.push('!');
        assert_eq!(
            signed.verify(&ring(&[&k])).unwrap_err(),
            SignatureError::BadSignature(KeyId::of(&k.verifying_key()))
        );
    }

    #[test]
    fn rejects_an_untrusted_key_even_with_a_valid_signature() {
        let signed = Signed::sign(Note("hello".into()), &key(2));
        assert!(matches!(
            signed.verify(&ring(&[&key(1)])),
            Err(SignatureError::UnknownKey(_))
        ));
    }

    #[test]
    fn rejects_a_forged_key_id() {
        let (trusted, attacker) = (key(1), key(2));
        let mut signed = Signed::sign(Note("hello".into()), &attacker);
        signed.key_id = KeyId::of(&trusted.verifying_key());
        assert!(matches!(
            signed.verify(&ring(&[&trusted])),
            Err(SignatureError::BadSignature(_))
        ));
    }

    #[test]
    fn rotation_accepts_old_and_new_keys() {
        let (old, new) = (key(1), key(2));
        let keys = ring(&[&old, &new]);
        assert!(Signed::sign(Note("a".into()), &old).verify(&keys).is_ok());
        assert!(Signed::sign(Note("b".into()), &new).verify(&keys).is_ok());
    }

    #[test]
    fn domain_separates_signatures() {
        let k = key(1);
        let signed = Signed::sign(Note("same".into()), &k);
        let replayed = Signed {
            content: OtherNote("same".into()),
            key_id: signed.key_id,
            signature: signed.signature,
        };
        assert!(replayed.verify(&ring(&[&k])).is_err());
    }
}
