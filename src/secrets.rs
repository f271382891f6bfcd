//! Credential primitives shared by devices, people and API keys: argon2 password hashes,
//! random tokens and SHA-256 digests (tokens are stored and cached only as digests).
use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};

/// An argon2 PHC string for `password` (stored for password credentials and service accounts).
pub fn hash_password(password: &[u8]) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password, &salt).map(|h| h.to_string()).unwrap_or_default()
}

/// Does `password` match the argon2 PHC string?
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

/// A random access token (128 bits, hex).
pub fn random_token() -> String {
    random_hex(16)
}

/// `bytes` random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// SHA-256 of `b`, as hex.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}
