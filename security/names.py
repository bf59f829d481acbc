"""What a certificate may name, checked before anything is issued: a refused name must not cost the
certificate in place (``fedge pki server-cert --ip 999.1.1.1`` once stored a DNS name ``999.1.1.1``)."""

from __future__ import annotations

import ipaddress
import re

# RFC 1123 labels; a last label of digits only is an IPv4 address gone wrong (999.1.1.1), not a name.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)*(?=[0-9-]*[A-Za-z]){_LABEL}")


def ip_address(value: str, flag: str = "--ip") -> str:
    """The canonical form of an IP address given as ``flag``; ``ValueError`` if it is none."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{flag} {value!r} is not an IP address") from None


def san_entry(value: str) -> str:
    """The canonical form of a name or address a certificate may carry; ``ValueError`` says what is wrong."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name")
    return value.lower()
