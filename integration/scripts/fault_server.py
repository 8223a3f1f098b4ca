"""Small upstream caches for ferry-substituter's tests, one behaviour each.

usage: fault_server.py MODE ADDR PORT DIR

  good     serve DIR like a static binary cache (GET and HEAD, 404 for absent files)
  error    answer 500 to everything
  garbage  answer 200 with an HTML page to everything (a captive portal / interstitial)
  drip     send headers, then one byte every 0.5 s
  reset    serve DIR, but reset the connection (RST) after RESET_AFTER bytes of any NAR;
           Range requests are ignored (the whole file is sent from byte 0 again)
  slow     serve DIR like good, but alive and slow to accept: one request at a time, each
           after SLOW_DELAY, one connection per request, and a listen backlog of 1, so that
           a burst of connections overflows the accept queue and the kernel drops SYNs
"""
import http.server
import os
import socket
import struct
import sys
import time

MODE, ADDR, PORT, DIR = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
RESET_AFTER = 64 * 1024
SLOW_DELAY = 0.04


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK add 40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (MODE, fmt % args))

    def file(self):
        rel = self.path.split("?", 1)[0].lstrip("/")
        if ".." in rel.split("/"):
            return None
        p = os.path.join(DIR, rel)
        return p if os.path.isfile(p) else None

    def send_plain(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if MODE == "slow":
            time.sleep(SLOW_DELAY)
        if MODE == "error":
            return self.send_plain(500, b"internal error\n")
        if MODE == "garbage":
            return self.send_plain(200, b"<html><body>Please sign in</body></html>\n", "text/html")
        if MODE == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
            return
        p = self.file()
        if p is None:
            return self.send_plain(404, b"not found\n")
        with open(p, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if MODE == "reset" and self.path.startswith("/nar/"):
            self.wfile.write(data[:RESET_AFTER])
            self.wfile.flush()
            # SO_LINGER with a zero timeout: close() sends RST, not FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)


if MODE == "slow":
    # HTTP/1.0: the connection closes after each answer, so every request needs an accept.
    Handler.protocol_version = "HTTP/1.0"

    class Slow(http.server.HTTPServer):
        request_queue_size = 1

    Slow((ADDR, PORT), Handler).serve_forever()
else:
    http.server.ThreadingHTTPServer.daemon_threads = True
    http.server.ThreadingHTTPServer((ADDR, PORT), Handler).serve_forever()
