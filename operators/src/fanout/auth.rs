//! Who is calling: JWT verification and the per-device access rule.
//!
//! A token comes as `Authorization: Bearer <jwt>` or, because browsers cannot set headers on a
//! WebSocket, as `?token=<jwt>`. The algorithm is pinned by configuration (a token whose header
//! names another algorithm, `none` included, is refused before its signature is looked at), `exp`
//! and `sub` are required, and `aud` / `iss` are checked when configured. `sub` is the user: the
//! owner of devices in the registry.
//!
//! Access to a device: an administrator sees every device; anyone else sees the devices whose
//! registry entry names them as owner or shares a group with the token's `groups` claim. A device
//! that is not registered is nobody's (in `iotpipe dev` it belongs to the dev owner).

use std::sync::Arc;

use axum::http::HeaderMap;
use iotpipe_pipeline::registry::DeviceEntry;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::config::{AuthConfig, AuthMode};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user (`sub`), owner of devices in the registry.
    pub user: Arc<str>,
    /// Administrators see every device and may use the admin endpoints.
    pub admin: bool,
    /// Groups (`groups` claim): devices sharing one are visible too.
    pub groups: Vec<String>,
    /// Tier (the configured tier claim), for limits.
    pub tier: Option<String>,
    /// `exp`, epoch seconds (`None` without authentication).
    pub expires_at: Option<i64>,
    /// False when authentication is off: nobody is identified, so per-user limits do not apply.
    pub authenticated: bool,
}

impl Caller {
    /// The caller when authentication is off: an administrator named after the dev owner.
    pub fn anonymous(user: &str) -> Self {
        Self {
            user: Arc::from(user),
            admin: true,
            groups: Vec::new(),
            tier: None,
            expires_at: None,
            authenticated: false,
        }
    }

    /// Whether this caller may see a device with this registry entry (`None`: not registered).
    pub fn may_see(&self, entry: Option<&DeviceEntry>) -> bool {
        self.admin
            || entry.is_some_and(|e| {
                *e.owner == *self.user || e.groups.iter().any(|g| self.groups.contains(g))
            })
    }
}

/// Why a request was not authenticated (answered with 401; the message names the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("missing token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// Anything else: bad signature, wrong algorithm, wrong audience, malformed.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens as configured.
pub struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    validation: Validation,
    admin_claim: String,
    tier_claim: String,
    anonymous: Caller,
}

impl Authenticator {
    /// Builds the verifier; `anonymous_user` names the caller when authentication is off.
    ///
    /// # Errors
    /// When the RS256 key file cannot be read or is not a PEM RSA public key.
    pub fn new(cfg: &AuthConfig, anonymous_user: &str) -> anyhow::Result<Self> {
        let (key, alg) = match cfg.mode {
            AuthMode::None => (None, Algorithm::HS256),
            AuthMode::Hs256 => (
                Some(
                    DecodingKey::from_secret(cfg.secret.as_bytes())
                        .map_err(|e| anyhow::anyhow!("fanout.auth.secret: {e}"))?,
                ),
                Algorithm::HS256,
            ),
            AuthMode::Rs256 => {
                let path = cfg.public_key_file.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("fanout.auth.public_key_file is required for rs256")
                })?;
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("fanout.auth.public_key_file {}: {e}", path.display())
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("fanout.auth.public_key_file {}: {e}", path.display())
                })?;
                (Some(key), Algorithm::RS256)
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if cfg.audience.is_some() {
            required.push("aud");
        }
        if cfg.issuer.is_some() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            mode: cfg.mode,
            key,
            validation,
            admin_claim: cfg.admin_claim.clone(),
            tier_claim: cfg.tier_claim.clone(),
            anonymous: Caller::anonymous(anonymous_user),
        })
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.mode != AuthMode::None
    }

    /// Verifies one token.
    ///
    /// # Errors
    /// [`AuthError`].
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let Some(key) = &self.key else {
            return Ok(self.anonymous.clone());
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        let user = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            _ => {
                return Err(AuthError::Invalid(
                    "`sub` must be a non-empty string".into(),
                ))
            }
        };
        let groups = match claims.get("groups") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|g| g.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| AuthError::Invalid("`groups` must be strings".into()))?,
            Some(_) => return Err(AuthError::Invalid("`groups` must be an array".into())),
        };
        Ok(Caller {
            user: Arc::from(user),
            admin: claims.get(&self.admin_claim) == Some(&Value::Bool(true)),
            groups,
            tier: claims
                .get(&self.tier_claim)
                .and_then(Value::as_str)
                .map(str::to_owned),
            expires_at: claims.get("exp").and_then(Value::as_i64),
            authenticated: true,
        })
    }

    /// The caller of a request: its bearer token, else its `token` query parameter.
    ///
    /// # Errors
    /// [`AuthError`].
    pub fn from_request(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Caller, AuthError> {
        if !self.enabled() {
            return Ok(self.anonymous.clone());
        }
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let token = bearer.or_else(|| query?.split('&').find_map(|kv| kv.strip_prefix("token=")));
        match token {
            Some(t) if !t.is_empty() => self.verify(t),
            _ => Err(AuthError::Missing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs(cfg: impl FnOnce(&mut AuthConfig)) -> Authenticator {
        let mut c = AuthConfig {
            mode: AuthMode::Hs256,
            secret: SECRET.into(),
            ..AuthConfig::default()
        };
        cfg(&mut c);
        Authenticator::new(&c, "local").unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn token(claims: Value) -> String {
        encode(&Header::default(), &claims, &hmac_key(SECRET.as_bytes())).unwrap_or_default()
    }

    fn hmac_key(secret: &[u8]) -> EncodingKey {
        EncodingKey::from_secret(secret).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn exp(from_now: i64) -> i64 {
        iotpipe_pipeline::time::now_ms() / 1000 + from_now
    }

    #[test]
    fn reads_user_admin_groups_and_tier() {
        let a = hs(|_| {});
        let c = a
            .verify(&token(json!({"sub": "alice", "exp": exp(60), "admin": true, "tier": "paid", "groups": ["lab"]})))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(&*c.user, "alice");
        assert!(c.admin && c.authenticated);
        assert_eq!(c.groups, ["lab"]);
        assert_eq!(c.tier.as_deref(), Some("paid"));
        // `admin` must be the boolean true, not a truthy string.
        let c = a
            .verify(&token(
                json!({"sub": "bob", "exp": exp(60), "admin": "true"}),
            ))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!c.admin);
    }

    #[test]
    fn refuses_expired_unsigned_foreign_and_claimless_tokens() {
        let a = hs(|_| {});
        assert_eq!(
            a.verify(&token(json!({"sub": "alice", "exp": exp(-60)}))),
            Err(AuthError::Expired)
        );
        // No exp, no sub.
        assert!(matches!(
            a.verify(&token(json!({"sub": "alice"}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            a.verify(&token(json!({"exp": exp(60)}))),
            Err(AuthError::Invalid(_))
        ));
        // Another key.
        let forged = encode(
            &Header::default(),
            &json!({"sub": "alice", "exp": exp(60)}),
            &hmac_key(b"another secret, also 32 bytes long"),
        )
        .unwrap_or_default();
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        // alg=none: header {"alg":"none","typ":"JWT"}, same claims, empty signature.
        let b64 = |v: &Value| base64url(v.to_string().as_bytes());
        let unsigned = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": "alice", "exp": exp(60), "admin": true}))
        );
        assert!(matches!(a.verify(&unsigned), Err(AuthError::Invalid(_))));
        // HS384 with the right secret: the algorithm is pinned.
        let other_alg = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "alice", "exp": exp(60)}),
            &hmac_key(SECRET.as_bytes()),
        )
        .unwrap_or_default();
        assert!(matches!(a.verify(&other_alg), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn checks_audience_and_issuer_when_configured() {
        let a = hs(|c| {
            c.audience = Some("iotpipe".into());
            c.issuer = Some("https://auth.example".into());
        });
        let ok =
            json!({"sub": "a", "exp": exp(60), "aud": "iotpipe", "iss": "https://auth.example"});
        assert!(a.verify(&token(ok)).is_ok());
        for bad in [
            json!({"sub": "a", "exp": exp(60), "aud": "other", "iss": "https://auth.example"}),
            json!({"sub": "a", "exp": exp(60), "aud": "iotpipe", "iss": "https://evil.example"}),
            json!({"sub": "a", "exp": exp(60), "iss": "https://auth.example"}),
            json!({"sub": "a", "exp": exp(60), "aud": "iotpipe"}),
        ] {
            assert!(a.verify(&token(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn rs256_verifies_with_the_public_key_only() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let public = dir.path().join("pub.pem");
        std::fs::write(
            &public,
            include_str!("../../../tests/fixtures/jwt-rs256.pub.pem"),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let a = Authenticator::new(
            &AuthConfig {
                mode: AuthMode::Rs256,
                public_key_file: Some(public),
                ..AuthConfig::default()
            },
            "local",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let private =
            EncodingKey::from_rsa_pem(include_bytes!("../../../tests/fixtures/jwt-rs256.key.pem"))
                .unwrap_or_else(|e| unreachable!("{e}"));
        let claims = json!({"sub": "alice", "exp": exp(60)});
        let t = encode(&Header::new(Algorithm::RS256), &claims, &private).unwrap_or_default();
        assert_eq!(a.verify(&t).map(|c| c.user.to_string()), Ok("alice".into()));
        // An HS256 token made with the public key as the secret (the classic key-confusion
        // attack) is refused: the algorithm is pinned.
        let confused = encode(
            &Header::default(),
            &claims,
            &hmac_key(include_bytes!("../../../tests/fixtures/jwt-rs256.pub.pem")),
        )
        .unwrap_or_default();
        assert!(matches!(a.verify(&confused), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn token_from_header_or_query_and_access_rule() {
        let a = hs(|_| {});
        let t = token(json!({"sub": "alice", "exp": exp(60), "groups": ["lab"]}));
        let mut h = HeaderMap::new();
        assert_eq!(a.from_request(&h, None), Err(AuthError::Missing));
        let c = a
            .from_request(&h, Some(&format!("x=1&token={t}")))
            .unwrap_or_else(|e| unreachable!("{e}"));
        h.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {t}")
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(a.from_request(&h, None), Ok(c.clone()));
        let entry = |owner: &str, groups: &[&str]| DeviceEntry {
            device: "d".into(),
            owner: owner.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            updated_at: 0,
        };
        assert!(c.may_see(Some(&entry("alice", &[]))));
        assert!(c.may_see(Some(&entry("bob", &["lab"]))));
        assert!(!c.may_see(Some(&entry("bob", &["home"]))));
        assert!(!c.may_see(None), "an unregistered device is nobody's");
        assert!(Caller::anonymous("local").may_see(None));
        // Off: everyone is the anonymous administrator.
        let off = Authenticator::new(&AuthConfig::default(), "local")
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            off.from_request(&HeaderMap::new(), None),
            Ok(Caller::anonymous("local"))
        );
    }

    fn base64url(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
