#!/usr/bin/env python3
"""A customer PC for the demo and the end-to-end tests: an HTTP page that names
its site (port 80) and a TCP echo (port 7). Runs inside the PC's network
namespace; stops on SIGTERM."""
import http.server
import socketserver
import sys
import threading

site = sys.argv[1] if len(sys.argv) > 1 else "unknown site"
page = f"<!doctype html><title>{site}</title><h1>PC 192.168.1.10 at {site}</h1>\n".encode()


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args):
        pass


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


echo = Threaded(("0.0.0.0", 7), Echo)
threading.Thread(target=echo.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", 80), Page).serve_forever()
