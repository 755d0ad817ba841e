"""The ceiling: drain ``GET /v1/records`` with requests + orjson, no database.

One request at a time, like a single consumer; limit 500. Environment: SEQUIN_BASE_URL,
SEQUIN_API_TOKEN. Prints one summary line.
"""

from __future__ import annotations

import os
import time

import orjson
import requests


def main() -> None:
    url = os.environ["SEQUIN_BASE_URL"].rstrip("/") + "/v1/records"
    http = requests.Session()
    http.headers["Authorization"] = "Bearer " + os.environ["SEQUIN_API_TOKEN"]
    started, total, size = time.monotonic(), 0, 0
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 500}
        if cursor:
            params["after_cursor"] = cursor
        resp = http.get(url, params=params, timeout=60)
        resp.raise_for_status()
        page = orjson.loads(resp.content)
        total += len(page["records"])
        size += len(resp.content)
        cursor = page["cursor"]
        if len(page["records"]) < 500:
            break
    seconds = time.monotonic() - started
    print(
        f"drain complete: {total} records in {seconds:.2f} s "
        f"({total / seconds:.0f} records/s, {size / seconds / 1e6:.1f} MB/s)"
    )


if __name__ == "__main__":
    main()
