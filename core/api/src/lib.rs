//! Types generated from `proto/`, the project's one schema.
//!
//! Every message has prost (binary) and pbjson (protobuf JSON mapping) codecs, so a
//! config file and a control-plane stream decode to the same Rust value; services
//! have tonic clients.

pub mod config {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/pymesh.config.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/pymesh.config.v1.serde.rs"));
    }
}

pub mod mesh {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/pymesh.mesh.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/pymesh.mesh.v1.serde.rs"));
    }
}
