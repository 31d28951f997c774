//! Mutual authentication of every connection with a pre-shared key.
//!
//! Both sides contribute a 32-byte random nonce. The destination proves possession of the key
//! first (so a source never sends memory to an impostor), then checks the source's proof before
//! it accepts a single record. A proof is HMAC-SHA256 over a role label, the channel, the
//! session id and both nonces, so a proof cannot be replayed on another connection or reflected
//! back to its sender.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

/// A pre-shared key (at least 16 bytes).
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    pub const MIN_LEN: usize = 16;

    /// Accepts keys of at least [`AuthKey::MIN_LEN`] bytes; surrounding whitespace (a key file's
    /// trailing newline) is trimmed.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < Self::MIN_LEN {
            return Err(format!(
                "the key has {} bytes; at least {} are required",
                trimmed.len(),
                Self::MIN_LEN
            ));
        }
        Ok(Self(trimmed.to_vec()))
    }
}

/// Which side a proof speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

fn mac(
    key: &AuthKey,
    role: Role,
    channel: u8,
    session: u64,
    src: &[u8; NONCE_LEN],
    dst: &[u8; NONCE_LEN],
) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC accepts keys of any length");
    m.update(match role {
        Role::Source => b"UMIG-v1-source",
        Role::Destination => b"UMIG-v1-destin",
    });
    m.update(&[channel]);
    m.update(&session.to_le_bytes());
    m.update(src);
    m.update(dst);
    m
}

/// The proof `role` sends for this connection.
pub fn prove(
    key: &AuthKey,
    role: Role,
    channel: u8,
    session: u64,
    src: &[u8; NONCE_LEN],
    dst: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    mac(key, role, channel, session, src, dst)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn check(
    key: &AuthKey,
    role: Role,
    channel: u8,
    session: u64,
    src: &[u8; NONCE_LEN],
    dst: &[u8; NONCE_LEN],
    proof: &[u8; PROOF_LEN],
) -> bool {
    mac(key, role, channel, session, src, dst)
        .verify_slice(proof)
        .is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_everything() {
        let k = AuthKey::new(b"0123456789abcdef\n").unwrap();
        let other = AuthKey::new(b"0123456789abcdeX").unwrap();
        let (s, d) = ([1u8; 32], [2u8; 32]);
        let p = prove(&k, Role::Source, 0, 7, &s, &d);
        assert!(check(&k, Role::Source, 0, 7, &s, &d, &p));
        assert!(!check(&other, Role::Source, 0, 7, &s, &d, &p));
        assert!(
            !check(&k, Role::Destination, 0, 7, &s, &d, &p),
            "no reflection"
        );
        assert!(
            !check(&k, Role::Source, 1, 7, &s, &d, &p),
            "bound to the channel"
        );
        assert!(
            !check(&k, Role::Source, 0, 8, &s, &d, &p),
            "bound to the session"
        );
        assert!(
            !check(&k, Role::Source, 0, 7, &d, &s, &p),
            "bound to the nonces"
        );
        assert!(AuthKey::new(b"short").is_err());
    }
}
