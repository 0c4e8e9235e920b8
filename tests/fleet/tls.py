"""What a host presents on its TLS listener, verified as a client would."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

__all__ = ["served"]


def served(address: str, ca: Path, name: str) -> x509.Certificate:
    """The certificate the host at ``address`` presents for ``name`` on port 443,
    verified against ``ca`` for that name."""
    context = ssl.create_default_context(cafile=str(ca))
    with context.wrap_socket(
        socket.create_connection((address, 443), 5), server_hostname=name
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)
