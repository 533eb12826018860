//! Framing of the PostgreSQL protocol. Frames are split off the read buffer as [`Bytes`]
//! (header included), so they can be forwarded without copying or parsing.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// PostgreSQL's own limit for a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// PostgreSQL's own limit for any message (`MaxAllocSize`): a larger length is a lie or an
/// attack, and is refused before anything is allocated for it.
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// One frame: a startup-phase packet (no type byte) or a typed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Length-prefixed packet of the startup phase: StartupMessage, SSLRequest,
    /// GSSENCRequest, CancelRequest.
    Startup(Bytes),
    /// A typed message: type byte, length, body.
    Message(Bytes),
}

/// A typed message's type byte.
pub fn tag(frame: &Bytes) -> u8 {
    frame[0]
}

/// A typed message's body (after the type byte and the length).
pub fn body(frame: &Bytes) -> &[u8] {
    &frame[5..]
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid message length {0}")]
    BadLength(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes startup packets until told otherwise, then typed messages. Servers never send
/// startup packets, so the server side starts in the typed state.
#[derive(Debug)]
pub struct PgCodec {
    startup: bool,
}

impl PgCodec {
    pub fn startup() -> PgCodec {
        PgCodec { startup: true }
    }

    pub fn typed() -> PgCodec {
        PgCodec { startup: false }
    }

    pub fn set_typed(&mut self) {
        self.startup = false;
    }
}

impl Decoder for PgCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let (header, max) = if self.startup {
            (0, MAX_STARTUP_LEN)
        } else {
            (1, MAX_MESSAGE_LEN)
        };
        if src.len() < header + 4 {
            return Ok(None);
        }
        let len = (&src[header..header + 4]).get_u32() as usize;
        let min = if self.startup { 8 } else { 4 };
        if len < min || len > max {
            return Err(CodecError::BadLength(len));
        }
        if src.len() < header + len {
            // Grow by what has arrived, never by what the length claims.
            return Ok(None);
        }
        let frame = src.split_to(header + len).freeze();
        Ok(Some(if self.startup {
            Frame::Startup(frame)
        } else {
            Frame::Message(frame)
        }))
    }
}

impl Encoder<Bytes> for PgCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(bytes: &[u8]) -> Result<Option<Frame>, CodecError> {
        PgCodec::typed().decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn splits_whole_frames_and_waits_for_partial_ones() {
        let mut codec = PgCodec::typed();
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0bSELECT\0Z\0\0\0\x05I"[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Message(Bytes::from_static(b"Q\0\0\0\x0bSELECT\0")))
        );
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Message(Bytes::from_static(b"Z\0\0\0\x05I")))
        );
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        let mut partial = BytesMut::from(&b"Q\0\0\0\x0bSEL"[..]);
        assert_eq!(codec.decode(&mut partial).unwrap(), None);
    }

    #[test]
    fn refuses_absurd_lengths_before_allocating() {
        assert!(matches!(
            typed(b"Q\x7f\xff\xff\xff"),
            Err(CodecError::BadLength(_))
        ));
        assert!(matches!(
            typed(b"Q\0\0\0\x02"),
            Err(CodecError::BadLength(2))
        ));
        let mut startup = PgCodec::startup();
        assert!(startup
            .decode(&mut BytesMut::from(&b"\0\x01\0\0"[..]))
            .is_err());
        assert!(startup
            .decode(&mut BytesMut::from(&b"\0\0\0\x04"[..]))
            .is_err());
    }

    /// Any input either yields frames that exactly tile a prefix of it, waits, or fails:
    /// it never panics and never reads past what it was given.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut seed: u64 = 0x5eed;
        for round in 0..20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) as usize % 64;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 * 7) & 0xff) as u8)
                .collect();
            let mut codec = if round % 2 == 0 {
                PgCodec::typed()
            } else {
                PgCodec::startup()
            };
            let mut buf = BytesMut::from(&bytes[..]);
            let mut consumed = 0;
            while let Ok(Some(Frame::Message(f) | Frame::Startup(f))) = codec.decode(&mut buf) {
                assert_eq!(&bytes[consumed..consumed + f.len()], &f[..]);
                consumed += f.len();
            }
        }
    }
}
