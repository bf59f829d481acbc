"""``train`` and ``evaluate`` as an AWS Lambda handler: ``fedge.edge_functions.adapters.aws_lambda.handler``.

Invoke it with the function's event, plus ``"function": "evaluate"`` to evaluate (``train`` otherwise).
The Lambda sandbox is the warm instance: its model cache outlives an invocation, as on the agent.
"""

from __future__ import annotations

from typing import Any

from fedge.edge_functions.adapters.instance import Instance

instance = Instance()


def handler(event: dict[str, Any], _lambda_context: object = None) -> dict[str, Any]:
    """Lambda reports an exception to the caller as the invocation's error; the result is JSON."""
    event = dict(event)
    invocation = instance.invoke(event.pop("function", "train"), event)
    return {
        "result": invocation.result,
        "cold": invocation.cold,
        "startup_seconds": invocation.startup_seconds,
        "seconds": invocation.seconds,
    }
