"""One GET per URL, all at once (one thread and one fresh connection each), run inside the
client's namespace: the burst Nix sends when it queries a closure (25 parallel lookups).

usage: burst_client.py URL...    prints {"statuses": [...], "ms": [...]} in URL order
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse

urls = sys.argv[1:]
statuses = [0] * len(urls)
ms = [0.0] * len(urls)
start = threading.Barrier(len(urls))


def get(i, url):
    u = urllib.parse.urlsplit(url)
    start.wait()
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("GET", u.path)
        r = c.getresponse()
        r.read()
        statuses[i] = r.status
    except Exception:
        statuses[i] = -1
    ms[i] = (time.monotonic() - t) * 1000


threads = [threading.Thread(target=get, args=(i, u)) for i, u in enumerate(urls)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"statuses": statuses, "ms": ms}))
