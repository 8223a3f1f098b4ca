"""Benchmark driver run inside the client's namespace (the same client for direct and
through-Ferry runs, so ratios compare servers, not clients).

usage: bench_client.py latency URL N    N sequential GETs on one keep-alive connection;
                                        prints p50 and p99 in microseconds
       bench_client.py each URL...      one GET per URL on one connection per host;
                                        prints each latency in milliseconds
       bench_client.py throughput URL N N sequential downloads of URL; prints MiB/s
       bench_client.py concurrent URL C S
                                        C keep-alive connections (one thread each) GET URL
                                        for S seconds; prints p50/p99 in microseconds and
                                        requests per second (Python's GIL makes the client
                                        the bottleneck: compare servers, not absolutes)
"""
import http.client
import json
import sys
import threading
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
elif mode == "concurrent":
    url, conns, secs = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    lat = []
    lock = threading.Lock()
    start = threading.Barrier(conns + 1)

    def worker():
        c, path = conn(url)
        get(c, path)
        mine = []
        start.wait()
        end = time.perf_counter() + secs
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            status, _ = get(c, path)
            mine.append((time.perf_counter() - t) * 1e6)
            assert status == 200, status
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker) for _ in range(conns)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    el = time.perf_counter() - t0
    lat.sort()
    n = len(lat)
    print(json.dumps({"p50_us": lat[n // 2], "p99_us": lat[int(n * 0.99)], "rps": n / el}))
