"""The local API: a msgpack RPC over a Unix socket, served from the supervisor's loop.

`protocol` parses and encodes frames (constants shared with the client, `flashlexd.wire`),
`server.RpcServer` owns the socket and connections, `methods.Methods` implements the calls.
"""
from flashlexd.ipc.protocol import Limits, Pending, RpcFailure
from flashlexd.ipc.server import RpcServer, ServerError

__all__ = ["Limits", "Pending", "RpcFailure", "RpcServer", "ServerError"]
