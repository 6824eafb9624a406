//! What the fuzz targets share: how an input is cut into the bytes under test and the chunks
//! they arrive in, and a runtime to drive the async readers on.
//!
//! Every target's input is `[selector][n][n chunk sizes][body]`: the selector picks what is
//! fuzzed (and with which settings), the chunk sizes say how the body is split as it arrives
//! (a socket hands bytes over in pieces of any size, and a reader must not care), and the body
//! is the bytes themselves. A seed is `[selector][0][body]`: the body in one piece.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most chunk sizes an input may give; more are a waste of the fuzzer's bytes.
const MAX_CHUNK_SIZES: usize = 16;

/// An input cut into its parts.
pub struct Input<'a> {
    pub selector: u8,
    chunk_sizes: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> Input<'a> {
    /// `None` for an input too short to hold a selector.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&selector, rest) = data.split_first()?;
        let (sizes, rest) = match rest.split_first() {
            Some((&n, rest)) => rest.split_at((n as usize % (MAX_CHUNK_SIZES + 1)).min(rest.len())),
            None => (&[][..], rest),
        };
        Some(Self {
            selector,
            chunk_sizes: sizes,
            body: rest,
        })
    }

    /// The body as the chunks it arrives in: the sizes in turn, over and over, until the body
    /// is used up (a size of 0 is an empty chunk, which hyper may hand over too). Without a
    /// size above 0, the body in one chunk.
    pub fn chunks(&self) -> Vec<Bytes> {
        chunked(self.body, self.chunk_sizes)
    }
}

/// `body` cut as [`Input::chunks`] says.
pub fn chunked(body: &[u8], sizes: &[u8]) -> Vec<Bytes> {
    if sizes.iter().all(|&s| s == 0) {
        return vec![Bytes::copy_from_slice(body)];
    }
    let mut chunks = Vec::new();
    let mut at = 0;
    for &size in sizes.iter().cycle() {
        if at == body.len() {
            break;
        }
        let end = (at + size as usize).min(body.len());
        chunks.push(Bytes::copy_from_slice(&body[at..end]));
        at = end;
    }
    chunks
}

thread_local! {
    /// One runtime for every input: building one costs more than most inputs take.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds");
}

/// Runs `future` to its end on the thread's runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|runtime| runtime.block_on(future))
}

/// A connection whose peer sends `chunks`, one per read, and then closes; what is written to
/// it is dropped.
pub struct ChunkedStream {
    chunks: VecDeque<Bytes>,
}

impl ChunkedStream {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
        }
    }
}

impl AsyncRead for ChunkedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // An empty chunk would read as the end of the stream: skip it.
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        if let Some(front) = self.chunks.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChunkedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
