"""The local API's wire format, for clients: re-exported from `flashlexd.wire`, where the
daemon reads it too (one definition, importable from a source checkout)."""
from flashlexd.wire import (CONSUMER_NAME_RULE, DEFAULT_MAX_FRAME,
                            DEFAULT_MAX_PAYLOAD, DEFAULT_SOCKET, FULL_POLICIES,
                            HEADER, ID_LIMIT, MAX_ARRAY_LEN, MAX_IDS_PER_ACK, MAX_LIMIT, MAX_MAP_LEN,
                            MAX_RESPONSE_FRAME, MAX_WAIT_SECONDS, MIB, PROTOCOL_VERSION, PUBACK_STALLED, READS,
                            REQUEST_OVERHEAD, RESENDS, SOCKET_ENV, Code, encode_frame,
                            request_unpack_options, valid_consumer_name, version_mismatch)

__all__ = ["CONSUMER_NAME_RULE", "valid_consumer_name",
           "PROTOCOL_VERSION", "HEADER", "DEFAULT_SOCKET", "SOCKET_ENV", "FULL_POLICIES", "MIB",
           "REQUEST_OVERHEAD", "RESENDS", "DEFAULT_MAX_PAYLOAD", "DEFAULT_MAX_FRAME", "MAX_RESPONSE_FRAME",
           "MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_IDS_PER_ACK", "MAX_LIMIT", "MAX_WAIT_SECONDS",
           "ID_LIMIT", "PUBACK_STALLED", "READS", "Code", "encode_frame", "request_unpack_options", "version_mismatch"]
