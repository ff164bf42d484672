//! `tcp-echo` mode: every byte read is written back on the same connection.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Echo until the peer closes its side, then close ours. I/O errors just end the connection.
pub async fn serve_connection(mut stream: TcpStream) {
    let (mut reader, mut writer) = stream.split();
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}
