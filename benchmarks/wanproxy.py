"""A WAN profile for the benchmark: a TCP proxy on 127.0.0.1 that adds latency and shares one link.

    python benchmarks/wanproxy.py TARGET_PORT [--delay-ms 25] [--mbit 100]   prints its URL, serves until killed

Every byte crosses a link like a real one: it waits its turn on ONE link per
direction shared by all connections (serialization at --mbit), then travels
--delay-ms. toxiproxy's bandwidth toxic limits each connection on its own, so
8 connections would get 8 links; here 8 connections share one, as the
clients of a university cluster pushing to a cloud region do.
"""

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 64 * 1024  # 5 ms of a 100 Mbit/s link: fine enough for the connections to take turns


class Link:
    """One direction of the shared link: a byte may leave once the bytes before it have."""

    def __init__(self, bytes_per_s: float):
        self.bytes_per_s = bytes_per_s
        self.busy_until = 0.0
        self.bytes = 0  # carried so far: the harness reads how full the link was
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """The monotonic time at which `nbytes`, queued now, have been put on the wire."""
        with self.lock:
            self.bytes += nbytes
            self.busy_until = max(time.monotonic(), self.busy_until) + nbytes / self.bytes_per_s
            return self.busy_until


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _pipe(source: socket.socket, sink: socket.socket, link: Link, delay: float, done: threading.Barrier) -> None:
    """Read from source; each chunk is sent on once its turn on the link is over and `delay` has passed.

    The reader waits for its chunk's turn before reading the next, so a fast sender fills its TCP
    buffers and slows down, as it would before a real bottleneck.
    """
    due = queue.Queue()

    def deliver():
        try:
            while (item := due.get()) is not None:
                _sleep_until(item[0])
                sink.sendall(item[1])
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    writer = threading.Thread(target=deliver, daemon=True)
    writer.start()
    try:
        while data := source.recv(CHUNK):
            sent = link.reserve(len(data))
            due.put((sent + delay, data))
            _sleep_until(sent)
    except OSError:
        pass
    finally:
        due.put(None)
        writer.join()
        done.wait()


class WanProxy:
    """Listen on 127.0.0.1 (a free port) and forward every connection to 127.0.0.1:target_port."""

    def __init__(self, target_port: int, delay_ms: float = 25, mbit: float = 100):
        self.target_port, self.delay = target_port, delay_ms / 1000
        self.up, self.down = Link(mbit * 1e6 / 8), Link(mbit * 1e6 / 8)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def start(self) -> "WanProxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.listener.close()

    def _connection(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = threading.Barrier(2, action=lambda: (client.close(), server.close()))
        threading.Thread(target=_pipe, args=(server, client, self.down, self.delay, done), daemon=True).start()
        _pipe(client, server, self.up, self.delay, done)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_port", type=int, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--delay-ms", type=float, default=25, help="latency added each way, in ms [25]")
    parser.add_argument("--mbit", type=float, default=100, help="one shared link per direction, Mbit/s [100]")
    args = parser.parse_args(argv)
    proxy = WanProxy(args.target_port, args.delay_ms, args.mbit)
    print(proxy.url, flush=True)
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
