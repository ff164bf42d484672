//! The address a redirected connection's client dialed. netfilter's REDIRECT (the
//! init step's rules) rewrites a connection's destination to the proxy's listener and
//! keeps the original in its connection tracking, which the socket option
//! `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6) reads back.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share this number (linux/netfilter_ipv4.h,
/// linux/netfilter_ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where `stream`'s client meant to connect, if netfilter redirected it here; `None` for a
/// connection made to this socket's own address (or one netfilter does not track).
pub(crate) fn redirected_from(stream: &TcpStream) -> Option<SocketAddr> {
    // On a dual-stack listener an IPv4 connection's address is IPv4-mapped IPv6, but its
    // connection tracking (and so the option to ask) is IPv4's.
    let local = canonical(stream.local_addr().ok()?);
    let original = canonical(original_dst(stream, local.is_ipv4())?);
    (original != local).then_some(original)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(target_os = "linux")]
fn original_dst(stream: &TcpStream, ipv4: bool) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;

    let fd = stream.as_raw_fd();
    // SAFETY: sockaddr_storage is plain data, large enough for either family; the kernel
    // writes at most `len` bytes into it and reports how many.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if ipv4 { libc::SOL_IP } else { libc::SOL_IPV6 };
    // SAFETY: `fd` is an open socket for the duration of the call, and the pointer and
    // length describe `storage`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (its family says so).
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (its family says so).
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)))
        }
        _ => None,
    }
}

#[cfg(not(target_os = "linux"))]
fn original_dst(_stream: &TcpStream, _ipv4: bool) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_made_to_the_listener_is_not_redirected() {
        for (listen, dial) in [
            ("127.0.0.1:0", "127.0.0.1"),
            ("[::1]:0", "::1"),
            // Dual-stack: IPv4 arrives IPv4-mapped.
            ("[::]:0", "127.0.0.1"),
        ] {
            let Ok(listener) = tokio::net::TcpListener::bind(listen).await else {
                continue; // no IPv6 on this host
            };
            let port = listener.local_addr().unwrap().port();
            let _client = TcpStream::connect((dial, port)).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            assert_eq!(redirected_from(&server), None, "{listen} dialed at {dial}");
        }
    }
}
