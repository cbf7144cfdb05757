"""cowd: private copy-on-write views of shared file mappings.

The daemon serves msgpack-RPC on a Unix stream socket, keeps one
append-only log per client session and base file, and merges logs into
new versions of a base file on request.  See README.md for the whole
picture; this package holds the daemon and the parts of the wire format
that the client library shares with it.
"""

__version__ = "0.1.0"
