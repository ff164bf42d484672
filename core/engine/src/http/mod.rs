//! HTTP/1.1 and HTTP/2 proxying: serving a client connection with hyper and
//! forwarding each request to an endpoint of the routed service.

pub mod attempt;
pub mod body;
pub mod forward;
pub mod headers;
pub mod local;
pub mod replay;
pub mod server;
pub mod upstream;
