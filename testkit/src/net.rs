//! Ports for servers a test starts.

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process can take it before
/// the caller binds it, so a server started on it may have to be started again.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
