"""Schemathesis hooks and checks for tests/test_serve_fuzz.py, loaded by the schemathesis CLI
that test runs against a live deployment (``SCHEMATHESIS_HOOKS=tests.helpers_fuzz``)."""

from __future__ import annotations

import math

import schemathesis

#: The answer to a body that broke a parser in a way no check foresaw (serve/app.py's
#: ``unreadable``): still a 400, but a gap the fuzzers must never find.
UNFORESEEN = "could not be read"


def fill_the_shape(body) -> None:
    """What JSON Schema cannot say, made true of a schema-valid inference body: its data holds
    exactly as many values as its shape asks for (the values drawn, repeated or cut)."""
    tensor = body["inputs"][0]
    data = tensor["data"]
    if tensor["datatype"] == "BYTES":
        tensor["shape"] = [len(data)]
        return
    values: list = []
    stack = [data]
    while stack:  # flatten, in order
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            values.append(item)
    size = math.prod(int(d) for d in tensor["shape"])
    tensor["data"] = (values * (size // len(values) + 1))[:size]


@schemathesis.hook
def before_call(context, case, kwargs):
    """A schema-valid inference body gets data that fills its shape, so it is valid."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive and case.operation.path.endswith("/infer") \
            and isinstance(case.body, dict):
        fill_the_shape(case.body)


@schemathesis.check
def refusals_name_the_problem(ctx, response, case):
    """Every 4xx is one JSON ``{"error": "..."}`` naming a problem (not the catch-all), a 422
    only for a model output that is not finite, and there is never a 5xx."""
    status = response.status_code
    if status >= 500:
        raise AssertionError(f"a {status} answer: {response.text[:300]}")
    if status < 400:
        return None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, str) or not error:
        raise AssertionError(f"a {status} answer without a JSON 'error': {response.text[:300]}")
    if UNFORESEEN in error:
        raise AssertionError(f"a body no check foresaw: {error}")
    if status == 422 and "not finite" not in error:
        raise AssertionError(f"a 422 for something other than a model output that is not finite: {error}")
    return True
