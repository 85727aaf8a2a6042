//! Key helpers that match the `wg` tool: Curve25519 keys as 32 bytes, printed in standard base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;
use rand_core::{OsRng, RngCore};

use crate::WgError;

/// A fresh private key, clamped as `wg genkey` prints it.
pub fn generate_private_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    key
}

/// A fresh pre-shared key (`wg genpsk`): 32 random bytes.
pub fn generate_preshared_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    key
}

/// The public key of a private key (`wg pubkey`).
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    let secret = x25519::StaticSecret::from(*private_key);
    x25519::PublicKey::from(&secret).to_bytes()
}

/// A key in the text form `wg` uses: standard base64 with padding (44 characters).
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Parses a key printed by `wg` (surrounding whitespace is ignored).
pub fn decode_key(text: &str) -> Result<[u8; 32], WgError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| WgError::InvalidKey("not standard base64"))?;
    bytes.try_into().map_err(|_| WgError::InvalidKey("not 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_known_vector() {
        let k = generate_private_key();
        assert_eq!(decode_key(&encode_key(&k)).unwrap(), k);
        assert_eq!(k[0] & 7, 0);
        // RFC 7748 §6.1 test vector (Alice).
        let alice: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66, 0x45, 0xdf, 0x4c,
            0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let expect: [u8; 32] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7, 0x5a, 0x0d, 0xbf,
            0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(public_key(&alice), expect);
        assert!(decode_key("abc").is_err());
        assert!(decode_key(&STANDARD.encode([1u8; 31])).is_err());
    }
}
