//! SOCKS5 codec (RFC 1928, RFC 1929). Sans-IO.
