"""FastAPI dependencies: what a route needs from the running service, declared in its signature.

``create_app`` puts the federation, its trust and the change feed on the application once; routes name
them as ``Annotated`` types (FastAPI's dependency injection) instead of reaching into ``request.app.state``,
so a route says what it uses and a test can override any of them (``app.dependency_overrides``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from fedge.server.feed import ChangeFeed
from fedge.server.rounds import Federation
from fedge.server.trust import Trust


def federation(request: Request) -> Federation:
    return request.app.state.federation


def trust(request: Request) -> Trust:
    return request.app.state.trust


def feed(request: Request) -> ChangeFeed:
    return request.app.state.feed


FederationDep = Annotated[Federation, Depends(federation)]
TrustDep = Annotated[Trust, Depends(trust)]
FeedDep = Annotated[ChangeFeed, Depends(feed)]
