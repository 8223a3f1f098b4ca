"""Benchmark driver run inside the client's namespace (the same client for direct and
through-Ferry runs, so ratios compare servers, not clients).

usage: bench_client.py latency URL N    N sequential GETs on one keep-alive connection;
                                        prints p50 and p99 in microseconds
       bench_client.py each URL...      one GET per URL on one connection per host;
                                        prints each latency in milliseconds
       bench_client.py throughput URL N N sequential downloads of URL; prints MiB/s
"""
import http.client
import json
import sys
import time
import urllib.parse


def conn(url):
    u = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60), u.path


def get(c, path):
    c.request("GET", path)
    r = c.getresponse()
    n = 0
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        n += len(b)
    return r.status, n


mode = sys.argv[1]
if mode == "latency":
    c, path = conn(sys.argv[2])
    n = int(sys.argv[3])
    get(c, path)  # warm the connection and the server's caches
    times = []
    for _ in range(n):
        t = time.perf_counter()
        status, _ = get(c, path)
        times.append((time.perf_counter() - t) * 1e6)
        assert status == 200, status
    times.sort()
    print(json.dumps({"p50_us": times[n // 2], "p99_us": times[int(n * 0.99)]}))
elif mode == "each":
    out = []
    conns = {}
    for url in sys.argv[2:]:
        u = urllib.parse.urlsplit(url)
        if u.netloc not in conns:
            conns[u.netloc] = conn(url)[0]
        t = time.perf_counter()
        status, _ = get(conns[u.netloc], u.path)
        out.append({"ms": (time.perf_counter() - t) * 1e3, "status": status})
    print(json.dumps(out))
elif mode == "throughput":
    c, path = conn(sys.argv[2])
    n = int(sys.argv[3])
    total = 0
    t = time.perf_counter()
    for _ in range(n):
        status, got = get(c, path)
        assert status == 200, status
        total += got
    print(json.dumps({"mib_s": total / (1 << 20) / (time.perf_counter() - t), "bytes": total}))
