"""Single-thread cost of the request path, in microseconds per request.

    python benchmarks/hotpath.py

Measures the Python work a connection thread does per request, without sockets or
threads: the codec, the engine on a cached key (policy, cache, log line), and, for
comparison, the work of the bare ``readline`` reference server (``ref_readline.py``).
With one GIL, this work is what bounds decisions per second; the end-to-end benchmark
(``run.py``) adds the sockets, the thread switches and the flusher.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratelimit_policyd.cache import QuotaCache  # noqa: E402
from ratelimit_policyd.codec import PolicyDecoder  # noqa: E402
from ratelimit_policyd.engine import Engine  # noqa: E402
from ratelimit_policyd.model import Period  # noqa: E402
from ratelimit_policyd.policy import Limits  # noqa: E402
from ratelimit_policyd.storage import open_storage  # noqa: E402
from ratelimit_policyd.window import Calendar  # noqa: E402

TEMPLATE = (ROOT / "tests" / "data" / "postfix" / "rcpt-sasl-alice-1.txt").read_bytes()
N = 100_000
SENDERS = 1000


def best_of(runs: int, fn: object) -> float:
    results = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        results.append((time.perf_counter() - t) / N * 1e6)
    return min(results)


def main() -> None:
    reqs = [TEMPLATE.replace(b"alice@example.com", f"user{i}@example.com".encode())
            .replace(b"instance=", f"instance={i}.".encode()) for i in range(SENDERS)]
    decoder = PolicyDecoder()
    parsed = [decoder.feed(r)[0] for r in reqs]

    def codec() -> None:
        feed = decoder.feed
        for i in range(N):
            feed(reqs[i % SENDERS])

    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(f"sqlite:///{tmp}/db.sqlite3", create_schema=True)
        cache = QuotaCache(Calendar(Period.DAILY, "UTC"), 10**9)
        lines: deque[tuple[float, str]] = deque(maxlen=10_000)
        engine = Engine(Limits(default_quota=10**9), cache, storage,
                        decision_sink=lines.append)
        for attrs in parsed:
            engine.handle(attrs)  # every sender cached: the steady state

        def decide() -> None:
            handle = engine.handle
            for i in range(N):
                handle(parsed[i % SENDERS])

        def decide_nolog() -> None:
            engine.log_decisions = False
            try:
                decide()
            finally:
                engine.log_decisions = True

        stream = b"".join(reqs) * (N // SENDERS)

        def bare() -> None:
            # What ref_readline.py does per request, minus the socket.
            attrs: dict[str, str] = {}
            for line in io.BufferedReader(io.BytesIO(stream)):  # type: ignore[arg-type]
                line = line.rstrip(b"\n")
                if not line:
                    attrs = {}
                    continue
                k, _, v = line.partition(b"=")
                attrs[k.decode()] = v.decode()

        c, d, dn, b = (best_of(5, codec), best_of(5, decide), best_of(5, decide_nolog),
                       best_of(5, bare))
        storage.close()
    print(f"codec (decode one request)          {c:6.2f} us")
    print(f"engine, cached key, with log line   {d:6.2f} us")
    print(f"engine, cached key, no log line     {dn:6.2f} us")
    print(f"daemon total (codec + engine)       {c + d:6.2f} us")
    print(f"bare readline server's parsing      {b:6.2f} us")


if __name__ == "__main__":
    main()
