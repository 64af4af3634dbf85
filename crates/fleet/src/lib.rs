//! A fleet of cfr relays serving as one service (issue 12).
//!
//! One TOML file ([`FleetConfig`]) is shared by every member: the QUIC-LB connection-ID layout
//! (draft-ietf-quic-load-balancers-21), the service addresses clients connect to, the members (id,
//! listen address, host), the fleet's egress prefixes and the secret that keys the egress epochs. From
//! it each member derives its own relay configuration ([`FleetConfig::member`]): its listen address, its
//! QUIC-LB server ID and its disjoint egress sub-prefixes ([`subprefix`]), so no two members can ever
//! emit the same source address. The balancer in front of them is the kernel's nftables, with a ruleset
//! rendered by [`nft::ruleset`].

#![forbid(unsafe_code)]

mod config;
pub mod nft;
mod prefix;

pub use config::{
    FleetConfig, FleetEgress, FleetError, FleetQuicLb, FleetSection, Instance, Member,
};
pub use prefix::subprefix;
