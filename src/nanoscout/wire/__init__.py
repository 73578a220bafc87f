"""The wire: protocol (headers and codec, pure functions), transport (sockets), the error tree
and the particle table. Everything else in nanoscout builds on this layer; it imports none of
them."""
