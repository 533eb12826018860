//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on the server side: how clients prove to the proxy that
//! they know the configured password. The proxy keeps only the verifier (salt, StoredKey,
//! ServerKey), never a comparison against the password itself.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("wrong password")]
    WrongPassword,
}

/// What the server stores: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Verifier {
    /// A verifier with a fresh random salt, as PostgreSQL makes one.
    pub fn from_password(password: &str) -> Verifier {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Verifier::parse(&text)
            .unwrap_or_else(|| unreachable!("postgres-protocol makes well-formed verifiers"))
    }

    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored).ok()?,
            server_key: STANDARD.decode(server).ok()?,
        })
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// One exchange, after the client's first message.
pub struct ScramServer {
    verifier: Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Takes the client-first-message; returns the exchange and the server-first-message.
    pub fn start(
        verifier: &Verifier,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: "n,," (no channel binding) or "y,," (client could, we do not offer it).
        let (gs2_header, bare) = if let Some(rest) = text.strip_prefix("n,,") {
            ("n,,", rest)
        } else if let Some(rest) = text.strip_prefix("y,,") {
            ("y,,", rest)
        } else if text.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed("gs2 header"));
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("client nonce"))?;
        let server_nonce = STANDARD.encode(rand::random::<[u8; 18]>());
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = ScramServer {
            verifier: verifier.clone(),
            gs2_header: gs2_header.to_string(),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final-message's proof; returns the server-final-message.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut channel_binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel_binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let expected_binding = STANDARD.encode(self.gs2_header.as_bytes());
        if channel_binding != Some(expected_binding.as_str()) {
            return Err(ScramError::Malformed("channel binding data"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce"));
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof encoding"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(ScramError::WrongPassword);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let stored_key = Sha256::digest(&client_key);
        // Constant-time comparison: the time taken must not tell how much of the key matched.
        let difference = stored_key
            .iter()
            .zip(&self.verifier.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference != 0 || self.verifier.stored_key.len() != stored_key.len() {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::from_password(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unrequested());
        let (server, server_first) = ScramServer::start(&verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client update"))?;
        let server_final = server.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("server signature"))
    }

    #[test]
    fn the_right_password_passes_both_ways() {
        assert_eq!(exchange("s3cret ünï", "s3cret ünï"), Ok(()));
    }

    #[test]
    fn a_wrong_password_fails() {
        assert_eq!(exchange("s3cret", "guess"), Err(ScramError::WrongPassword));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let verifier = Verifier::from_password("x");
        assert!(ScramServer::start(&verifier, b"").is_err());
        assert!(ScramServer::start(&verifier, b"p=tls-server-end-point,,n=,r=abc").is_err());
        let (server, _) = ScramServer::start(&verifier, b"n,,n=,r=abc").unwrap();
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
        assert!(server.finish(b"\xff").is_err());
    }
}
