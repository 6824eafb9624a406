//! Proof of a shared link key on every RPC connection, before tarpc sees a byte.
//!
//! tarpc has no notion of who is calling: anyone who can reach a service's RPC port could open
//! or close rounds, or tell the coordinator an update was accepted. With `rpc.key_file` set on
//! both services, each connection starts with a challenge-response in both directions
//! (HMAC-SHA256 of fresh nonces under the key), and a connection that fails it is closed before
//! any request is read, so nothing a stranger sends reaches the state:
//!
//! ```text
//! server → client   "RONDOLK1" ‖ Ns            (32 random bytes)
//! client → server   Nc ‖ HMAC(key, "client" ‖ Ns ‖ Nc)
//! server → client   HMAC(key, "server" ‖ Nc ‖ Ns)   (the server knows the key too)
//! ```
//!
//! Fresh nonces on both sides make a recorded handshake useless for a replay. The key proves
//! membership only: it does not encrypt the link (that is TLS's job).
//! Without a key on either side there is no handshake at all (a development setup on one
//! machine); a key on one side only fails every connection, with a log line that says so.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 8] = b"RONDOLK1";
const NONCE: usize = 32;
const TAG: usize = 32;
/// A key shorter than this is refused at start-up: it could be guessed.
pub const MIN_KEY_BYTES: usize = 16;
/// The whole handshake must be over within this; a silent peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The secret both services share; `Debug` never shows it.
#[derive(Clone)]
pub struct LinkKey(Arc<[u8]>);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// The key in `path` (surrounding whitespace ignored), at least [`MIN_KEY_BYTES`] long.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::new(text.trim_ascii()).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn new(key: &[u8]) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the link key must be at least {MIN_KEY_BYTES} bytes, got {}",
                key.len()
            ));
        }
        Ok(Self(key.into()))
    }

    fn tag(&self, role: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(role);
        mac.update(first);
        mac.update(second);
        mac
    }
}

/// Why a handshake failed, for the log.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer does not know the link key")]
    WrongKey,
    #[error("the peer sent no link handshake (is rpc.key_file set on both services?)")]
    NoHandshake,
    #[error("link handshake timed out after {0:?}")]
    TimedOut(Duration),
    #[error("link handshake: {0}")]
    Io(#[from] std::io::Error),
}

fn nonce() -> [u8; NONCE] {
    let mut bytes = [0u8; NONCE];
    // The OS's random source failing is not something to carry on from.
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random source works");
    bytes
}

/// The server's side: challenge the client, check its answer, prove the key back. `None`:
/// no key, no handshake.
pub async fn accept<S>(stream: &mut S, key: Option<&LinkKey>) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(key) = key else { return Ok(()) };
    within(async {
        let server_nonce = nonce();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&server_nonce);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; NONCE + TAG];
        stream.read_exact(&mut answer).await?;
        let (client_nonce, tag) = answer.split_at(NONCE);
        key.tag(b"client", &server_nonce, client_nonce)
            .verify_slice(tag)
            .map_err(|_| HandshakeError::WrongKey)?;
        let proof = key.tag(b"server", client_nonce, &server_nonce).finalize();
        stream.write_all(&proof.into_bytes()).await?;
        Ok(())
    })
    .await
}

/// The client's side: answer the server's challenge and check its proof. `None`: no key, no
/// handshake.
pub async fn connect<S>(stream: &mut S, key: Option<&LinkKey>) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(key) = key else { return Ok(()) };
    within(async {
        let mut hello = [0u8; MAGIC.len() + NONCE];
        stream.read_exact(&mut hello).await?;
        let (magic, server_nonce) = hello.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(HandshakeError::NoHandshake);
        }
        let client_nonce = nonce();
        let tag = key.tag(b"client", server_nonce, &client_nonce).finalize();
        let mut answer = client_nonce.to_vec();
        answer.extend_from_slice(&tag.into_bytes());
        stream.write_all(&answer).await?;
        let mut proof = [0u8; TAG];
        stream.read_exact(&mut proof).await?;
        key.tag(b"server", &client_nonce, server_nonce)
            .verify_slice(&proof)
            .map_err(|_| HandshakeError::WrongKey)
    })
    .await
}

async fn within(
    handshake: impl Future<Output = Result<(), HandshakeError>>,
) -> Result<(), HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Err(HandshakeError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(HandshakeError::WrongKey)
        }
        Ok(result) => result,
        Err(_) => Err(HandshakeError::TimedOut(HANDSHAKE_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> LinkKey {
        LinkKey::new(text.as_bytes()).unwrap()
    }

    async fn run(server: Option<LinkKey>, client: Option<LinkKey>) -> (bool, bool) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let (s, c) = tokio::join!(
            async move {
                let ok = accept(&mut a, server.as_ref()).await.is_ok();
                drop(a); // a refused connection is closed
                ok
            },
            async move { connect(&mut b, client.as_ref()).await.is_ok() }
        );
        (s, c)
    }

    #[tokio::test]
    async fn only_the_same_key_on_both_sides_gets_through() {
        let k = key("0123456789abcdef-shared");
        assert_eq!(run(Some(k.clone()), Some(k.clone())).await, (true, true));
        let other = key("0123456789abcdef-other!");
        assert_eq!(run(Some(k.clone()), Some(other)).await, (false, false));
        assert_eq!(run(None, None).await, (true, true), "no key: no handshake");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_without_the_key_is_dropped_within_the_timeout() {
        let k = key("0123456789abcdef-shared");
        // The client has no key: it never answers the challenge.
        let (mut a, _b) = tokio::io::duplex(1024);
        let refused = accept(&mut a, Some(&k)).await;
        assert!(
            matches!(refused, Err(HandshakeError::TimedOut(_))),
            "{refused:?}"
        );
        // The server has no key: the client waits for a challenge that never comes.
        let (_a, mut b) = tokio::io::duplex(1024);
        assert!(connect(&mut b, Some(&k)).await.is_err());
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_key() {
        assert!(
            LinkKey::new(b"short")
                .unwrap_err()
                .contains("at least 16 bytes")
        );
        assert_eq!(
            format!("{:?}", key("0123456789abcdef-secret")),
            "LinkKey(..)"
        );
    }
}
