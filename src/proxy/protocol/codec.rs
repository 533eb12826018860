//! Framing of the PostgreSQL protocol. Frames are split off the read buffer as [`Bytes`]
//! (header included), so they can be forwarded without copying or parsing.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::io::AsyncWrite;
use tokio_util::codec::{Decoder, Encoder, FramedWrite};

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
    /// Server side, once logged in: a run of consecutive messages the proxy only forwards
    /// (see [`passes_through`]) comes out as one frame, so a result of many rows costs one
    /// frame, one copy and one write instead of one per row.
    batch: bool,
}

/// Server messages the proxy forwards without looking at them: row descriptions and rows,
/// completions, notices, notifications, copy-out data. Everything else (ParseComplete and
/// CloseComplete it may swallow, ParameterStatus, CopyInResponse, ErrorResponse,
/// ReadyForQuery, authentication) comes alone.
pub fn passes_through(tag: u8) -> bool {
    matches!(
        tag,
        b'D' | b'T' | b'C' | b'2' | b'n' | b't' | b's' | b'I' | b'N' | b'A' | b'd' | b'c' | b'H'
    )
}

impl PgCodec {
    pub fn startup() -> PgCodec {
        PgCodec {
            startup: true,
            batch: false,
        }
    }

    pub fn typed() -> PgCodec {
        PgCodec {
            startup: false,
            batch: false,
        }
    }

    pub fn set_typed(&mut self) {
        self.startup = false;
    }

    /// From now on, runs of [`passes_through`] messages come out as one frame.
    pub fn batch_pass_through(&mut self) {
        self.batch = true;
    }

    pub fn batching(&self) -> bool {
        self.batch
    }

    /// The length of the complete, well-formed message at the front of `src`, if any.
    #[inline(always)]
    fn complete_message(src: &[u8]) -> Option<usize> {
        let len = u32::from_be_bytes(src.get(1..5)?.try_into().ok()?) as usize;
        (4..=MAX_MESSAGE_LEN).contains(&len).then_some(())?;
        (src.len() > len).then_some(1 + len)
    }
}

/// Splits off the typed frame that is complete at the front of a read buffer, if there is
/// one, as the decoder would (`batch`: see [`PgCodec::batch_pass_through`]). For a session
/// that handles what one read brought without going back to its select loop; anything else
/// (a partial or malformed message) is left for the decoder.
pub fn split_buffered(src: &mut BytesMut, batch: bool) -> Option<Bytes> {
    let end = buffered(src, batch)?;
    Some(src.split_to(end).freeze())
}

/// The length of what [`split_buffered`] would split off, without splitting it: for a session
/// that copies a message it only forwards straight from one connection's read buffer to the
/// other's write buffer (and then advances past it), which costs no reference count.
#[inline(always)]
pub fn buffered(src: &[u8], batch: bool) -> Option<usize> {
    let mut end = PgCodec::complete_message(src)?;
    if batch && passes_through(src[0]) {
        // A plain loop: written with Option's combinators it was not inlined (50
        // instructions a transaction).
        while end < src.len() && passes_through(src[end]) {
            match PgCodec::complete_message(&src[end..]) {
                Some(next) => end += next,
                None => break,
            }
        }
    }
    Some(end)
}

/// Moves an empty buffer's start back to the start of its allocation, when nothing else holds a
/// part of it (a frame split off it and still alive), so that the next read or write lands in
/// the same few cache lines as the last one. Without it every read or write goes past the
/// previous one until the buffer's 8 KiB are used up: at 16 clients, the 4 buffers of each
/// transaction touched fresh cache lines on every message, for the proxy, and for the
/// kernel's copies in and out of them.
pub fn rewind(buffer: &mut BytesMut) {
    if buffer.is_empty() {
        // Asking for one byte more than is left past the start succeeds, without allocating,
        // only by moving the start back; when it cannot (nothing to move back, or shared), the
        // buffer stays as it is.
        let _ = buffer.try_reclaim(buffer.capacity() + 1);
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
        if self.startup {
            return Ok(Some(Frame::Startup(src.split_to(len).freeze())));
        }
        Ok(split_buffered(src, self.batch).map(Frame::Message))
    }
}

/// Puts a frame in `writer`'s buffer, as `SinkExt::feed` would, but without its trip through a
/// future, a readiness check and the encoder for every frame the proxy forwards. Past the
/// writer's backpressure boundary the buffer is flushed first (as `feed` does), so a large
/// result or COPY is never held whole; only then is there anything to wait for.
pub async fn queue<W: AsyncWrite + Unpin>(
    writer: &mut FramedWrite<W, PgCodec>,
    frame: &[u8],
) -> Result<(), CodecError> {
    if !try_queue(writer, frame) {
        writer.flush().await?;
        append(writer.write_buffer_mut(), frame);
    }
    Ok(())
}

/// [`queue`] when the buffer has room, without a future; false (and nothing queued) when it
/// must be flushed first. Hot paths call it before `queue`, so that a frame costs no future.
#[inline]
pub fn try_queue<W>(writer: &mut FramedWrite<W, PgCodec>, frame: &[u8]) -> bool {
    if !has_room(writer) {
        return false;
    }
    append(writer.write_buffer_mut(), frame);
    true
}

/// Whether [`try_queue`] would take a frame now.
#[inline]
pub fn has_room<W>(writer: &FramedWrite<W, PgCodec>) -> bool {
    writer.write_buffer().len() < writer.backpressure_boundary()
}

/// Every write buffer's one way in: a buffer that was flushed empty starts again at the
/// start of its allocation ([`rewind`]) before the frame goes in.
#[inline(always)]
fn append(buffer: &mut BytesMut, frame: &[u8]) {
    rewind(buffer);
    buffer.extend_from_slice(frame);
}

impl Encoder<Bytes> for PgCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        append(dst, &item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_buffer_starts_again_at_the_start_of_its_allocation() {
        let mut read = BytesMut::with_capacity(64);
        let start = read.as_ptr();
        read.extend_from_slice(b"Z\0\0\0\x05I");
        let frame = split_buffered(&mut read, false);
        // A frame still alive holds the allocation: nothing moves.
        rewind(&mut read);
        assert_ne!(read.as_ptr(), start);
        drop(frame);
        rewind(&mut read);
        assert_eq!(read.as_ptr(), start);
        assert_eq!(read.capacity(), 64);

        let mut write = BytesMut::with_capacity(64);
        let start = write.as_ptr();
        write.extend_from_slice(b"Z\0\0\0\x05I");
        write.advance(3);
        // Not empty: the rest is still to be written.
        rewind(&mut write);
        assert_ne!(write.as_ptr(), start);
        write.advance(3);
        rewind(&mut write);
        assert_eq!(write.as_ptr(), start);
        assert_eq!(write.capacity(), 64);
        write.extend_from_slice(b"x");
        assert_eq!(&write[..], b"x");
    }

    #[tokio::test]
    async fn queued_frames_wait_in_the_buffer_until_it_is_full() {
        let mut writer = FramedWrite::new(Vec::new(), PgCodec::typed());
        writer.set_backpressure_boundary(8);
        assert!(try_queue(&mut writer, b"Z\0\0\0\x05I"));
        assert!(
            writer.get_ref().is_empty(),
            "nothing written before a flush"
        );
        assert!(try_queue(&mut writer, b"Z\0\0\0\x05I"));
        // Past the boundary: try_queue leaves it to queue, which flushes first.
        assert!(!try_queue(&mut writer, b"Z\0\0\0\x05T"));
        assert_eq!(writer.write_buffer().len(), 12);
        queue(&mut writer, b"Z\0\0\0\x05T").await.unwrap();
        assert_eq!(writer.get_ref().len(), 12);
        assert_eq!(&writer.write_buffer()[..], b"Z\0\0\0\x05T");
    }

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
    fn batches_runs_of_forwarded_messages_only() {
        let mut codec = PgCodec::typed();
        codec.batch_pass_through();
        let rows = b"T\0\0\0\x06\0\0D\0\0\0\x06\0\0C\0\0\0\x05\0";
        let mut input = b"1\0\0\0\x04".to_vec();
        input.extend_from_slice(rows);
        input.extend_from_slice(b"Z\0\0\0\x05ID\0\0\0\x06\0");
        let mut buf = BytesMut::from(&input[..]);
        let mut next = || match codec.decode(&mut buf).unwrap() {
            Some(Frame::Message(frame)) => frame.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(next(), b"1\0\0\0\x04");
        assert_eq!(next(), rows);
        assert_eq!(next(), b"Z\0\0\0\x05I");
        // A message not complete yet is neither returned nor waited for by a batch.
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\0D\x7f\xff\xff\xff");
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Message(Bytes::from_static(b"D\0\0\0\x06\0\0")))
        );
        assert!(codec.decode(&mut buf).is_err());
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

    /// A tiny deterministic generator (the LCG of Knuth's MMIX): reproducible rounds.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as usize % below
        }
    }

    /// Valid frames, concatenated and delivered in pieces of any size, come back exactly, one
    /// by one, whatever the split points; a frame whose length is corrupted stops the stream
    /// with an error or a wait, after exactly the frames before it.
    #[test]
    fn frames_survive_any_split_and_corruption_stops_them_cleanly() {
        let mut rng = Lcg(0xf4a3e);
        for round in 0..2_000 {
            let frames: Vec<Vec<u8>> = (0..1 + rng.next(8))
                .map(|_| {
                    let body: Vec<u8> = (0..rng.next(300)).map(|_| rng.next(256) as u8).collect();
                    let mut frame = vec![b"QPBEDSCdX"[rng.next(9)]];
                    frame.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                    frame.extend_from_slice(&body);
                    frame
                })
                .collect();
            let mut wire: Vec<u8> = frames.concat();
            let corrupt = (round % 4 == 0).then(|| rng.next(frames.len()));
            if let Some(at) = corrupt {
                let offset: usize = frames[..at].iter().map(Vec::len).sum();
                let absurd = [0x7f, 0xff, 0xff, 0xff - rng.next(3) as u8];
                let small = [0, 0, 0, rng.next(4) as u8];
                let bad = if rng.next(2) == 0 { absurd } else { small };
                wire[offset + 1..offset + 5].copy_from_slice(&bad);
            }
            let mut codec = PgCodec::typed();
            let mut buf = BytesMut::new();
            let (mut fed, mut decoded, mut failed) = (0, Vec::new(), false);
            while fed < wire.len() && !failed {
                let piece = (1 + rng.next(97)).min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + piece]);
                fed += piece;
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(Frame::Message(frame))) => decoded.push(frame.to_vec()),
                        Ok(Some(Frame::Startup(_))) => panic!("a startup frame from typed input"),
                        Ok(None) => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
            match corrupt {
                None => assert_eq!(decoded, frames, "round {round}"),
                Some(at) => assert_eq!(decoded, frames[..at], "round {round}"),
            }
        }
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
            let mut codec = match round % 3 {
                0 => PgCodec::typed(),
                1 => PgCodec::startup(),
                _ => {
                    let mut codec = PgCodec::typed();
                    codec.batch_pass_through();
                    codec
                }
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
