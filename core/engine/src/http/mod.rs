//! HTTP/1.1 and HTTP/2 proxying: serving a client connection with hyper and
//! forwarding each request to an endpoint of the routed service.

pub(crate) mod attempt;
pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod forward;
pub(crate) mod h2_stream;
pub(crate) mod headers;
pub(crate) mod local;
pub(crate) mod park;
pub(crate) mod pool;
pub(crate) mod replay;
pub(crate) mod server;
