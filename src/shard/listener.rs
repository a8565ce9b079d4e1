//! Listening sockets shared by shards through SO_REUSEPORT.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, TcpListener};

/// Binds `count` sockets to `addr` with SO_REUSEPORT. When `addr` has port
/// 0, the first socket picks the port and the others bind to the same one.
///
/// SO_REUSEPORT would let this process silently share a port with another
/// process that also set it; so the address is first probed with an
/// exclusive bind, which fails with "address in use" if anyone holds it.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    let probe = TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    let mut target = probe.local_addr()?;
    drop(probe);
    let mut out: Vec<TcpListener> = Vec::with_capacity(count);
    for _ in 0..count {
        let sock = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&target.into()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {target}: {e}"))
        })?;
        sock.listen(super::limits::LISTEN_BACKLOG_CONNECTIONS)?;
        let l: TcpListener = sock.into();
        target = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}
