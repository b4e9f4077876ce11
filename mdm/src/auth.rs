//! Users' passwords and session tokens.
//!
//! Passwords are stored as an iterated, salted SHA-256. A session token is
//! `hex(json{user, role, expires_unix}) "." hex(hmac_sha256(cluster secret, payload))`: any MDM
//! can verify it without shared session state, and it dies with its expiry.

use proto::model::Role;
use proto::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PASSWORD_ROUNDS: u32 = 10_000;

pub fn hash_password(salt: &str, password: &str) -> String {
    let mut h: [u8; 32] = Sha256::digest(format!("{salt}:{password}").as_bytes()).into();
    for _ in 0..PASSWORD_ROUNDS {
        h = Sha256::digest(h).into();
    }
    hex::encode(h)
}

pub fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[derive(Serialize, Deserialize)]
struct Claims {
    user: String,
    role: Role,
    expires_unix: u64,
}

pub fn make_token(secret: &str, user: &str, role: Role, expires_unix: u64) -> String {
    let payload = serde_json::to_vec(&Claims {
        user: user.into(),
        role,
        expires_unix,
    })
    .unwrap_or_default();
    format!(
        "{}.{}",
        hex::encode(&payload),
        hex::encode(hmac(secret.as_bytes(), &payload))
    )
}

/// Check a token: signature, expiry. Returns the user and role.
pub fn verify_token(secret: &str, token: &str, now_unix: u64) -> Result<(String, Role), WireError> {
    let bad = || {
        WireError::new(
            ErrorCode::Unauthenticated,
            "invalid session token, log in again",
        )
    };
    let (p, sig) = token.split_once('.').ok_or_else(bad)?;
    let payload = hex::decode(p).map_err(|_| bad())?;
    let sig = hex::decode(sig).map_err(|_| bad())?;
    // Constant-time comparison.
    let want = hmac(secret.as_bytes(), &payload);
    if sig.len() != want.len()
        || sig
            .iter()
            .zip(want.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
    {
        return Err(bad());
    }
    let c: Claims = serde_json::from_slice(&payload).map_err(|_| bad())?;
    if c.expires_unix <= now_unix {
        return Err(WireError::new(
            ErrorCode::Unauthenticated,
            "session expired, log in again",
        ));
    }
    Ok((c.user, c.role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_resist_tampering() {
        let t = make_token("k", "admin", Role::Administrator, 100);
        assert_eq!(
            verify_token("k", &t, 50).expect("valid").1,
            Role::Administrator
        );
        assert!(verify_token("k", &t, 100)
            .expect_err("expired")
            .message
            .contains("expired"));
        assert!(verify_token("other", &t, 50).is_err());
        let forged = make_token("k", "admin", Role::Monitor, 100).replace('.', "x");
        assert!(verify_token("k", &forged, 50).is_err());
        assert!(verify_token("k", "garbage", 50).is_err());
    }

    #[test]
    fn password_hash_depends_on_salt() {
        assert_ne!(hash_password("a", "p"), hash_password("b", "p"));
        assert_eq!(hash_password("a", "p"), hash_password("a", "p"));
    }
}
