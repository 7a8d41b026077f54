//! Tunnel transports and the relay.
