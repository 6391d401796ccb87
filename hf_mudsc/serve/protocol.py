"""The HTTP protocol `hf-mudsc serve` runs under uvicorn: its h11 protocol, whose own refusal of a request the app
never sees (not HTTP, or a request line and headers over `serve.HEADER_MAX_BYTES`) answers as the app does —
one line of JSON saying `nosniff` — instead of a plain-text 400 without it (uvicorn writes that answer itself,
outside every ASGI layer)."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from hf_mudsc.serve.app import NOSNIFF


class ServiceH11Protocol(H11Protocol):
    """uvicorn's h11 protocol (h11 is what caps the headers' size) with the service's 400."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        body = json.dumps({"error": f"the request is not valid HTTP/1.1, or its request line and headers are over "
                                    f"{limit} bytes ({msg.rstrip('.').lower()}); send a well-formed request with "
                                    "smaller headers"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (NOSNIFF[0].lower().encode(), NOSNIFF[1].encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
