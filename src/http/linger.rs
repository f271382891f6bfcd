//! The HTTP listeners' connections close lingering: when the server ends a connection (after a
//! 413 for a body it would not read, say), it half-closes and then reads and drops what the
//! client still sends — at most `LINGER_BYTES` for `LINGER` — before closing. Closing with
//! unread data makes the kernel answer with a reset, and a client still writing its body then
//! sees its request fail (a broken pipe or a reset) instead of reading the answer.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

const LINGER: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 64 << 20;

/// A listener whose connections close lingering (see the module).
pub struct Lingering(pub TcpListener);

impl axum::serve::Listener for Lingering {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match self.0.accept().await {
                Ok((s, a)) => {
                    let _ = s.set_nodelay(true);
                    return (Conn(Some(s)), a);
                }
                // Out of descriptors or a connection reset before it was accepted: the
                // listener goes on (a short pause lets descriptors free up).
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// One connection; dropping it starts the lingering close.
pub struct Conn(Option<TcpStream>);

impl Drop for Conn {
    fn drop(&mut self) {
        let (Some(mut s), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else { return };
        rt.spawn(async move {
            let _ = s.shutdown().await;
            let mut buf = [0u8; 16 * 1024];
            let mut left = LINGER_BYTES;
            let _ = tokio::time::timeout(LINGER, async {
                while left > 0 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left = left.saturating_sub(n as u64),
                    }
                }
            })
            .await;
        });
    }
}

fn stream(c: &mut Conn) -> io::Result<&mut TcpStream> {
    c.0.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(stream(&mut self)?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(stream(&mut self)?).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(stream(&mut self)?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(stream(&mut self)?).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(stream(&mut self)?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}
