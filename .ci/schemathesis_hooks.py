"""Schemathesis hooks for .ci/schemathesis: rules between parameters that OpenAPI cannot
state (each is in the parameters' descriptions and answered with a 400 by the server).

* `from` must not be later than `to` (dates YYYY-MM-DD or months YYYY-MM compare as text);
* `date` of /api/daily-metrics/ is used instead of `from`/`to`, not with them.

Cases that break one are mended just before they are sent (bounds swapped, or `date`
dropped), in every phase, rather than filtered out, so that generation keeps its pace."""

import schemathesis


def _text(value):
    return value if isinstance(value, str) and value else None


@schemathesis.hook
def before_call(ctx, case, kwargs):
    query = case.query
    if not isinstance(query, dict):
        return
    start, end = _text(query.get("from")), _text(query.get("to"))
    if start and end and len(start) == len(end) and start > end:
        query["from"], query["to"] = end, start
    if _text(query.get("date")) and (_text(query.get("from")) or _text(query.get("to"))):
        del query["date"]
