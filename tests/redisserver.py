"""A real redis-server for tests: free loopback port, own directory, stopped (or killed) by PID."""

import os
import shutil
import signal
import subprocess
import time

import redis
from support import free_port, run_cli


class RedisServer:
    """`persistent` writes every command to an append-only file, so a killed server restarts with its data."""

    def __init__(self, directory, persistent: bool = False):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run scripts/install.sh")
        self.directory = str(directory)
        self.persistent = persistent
        self.port = free_port()
        self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.directory,
             "--daemonize", "no", "--loglevel", "warning", *durability],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def drain_killed_mid_way(server: RedisServer, proxy, env: dict, at_request: int = 3) -> None:
    """`drain --all` through `proxy` while redis-server is SIGKILLed at bulk request `at_request`.

    The drain must fail naming the server; then the server restarts (with its
    append-only file) and the killed drain's leases run out.
    """
    def plan(request):
        if request.ids and len(proxy.bulk_requests()) == at_request:
            server.kill()
        return None
    proxy.plan = plan
    code, _, stderr = run_cli("drain", "--all", url=proxy.url, queue_url=server.url(), env=env)
    assert code == 1 and server.url() in stderr, stderr
    server.start()
    time.sleep(float(env["PUSHAGENT_LEASE_SECONDS"]) + 0.2)
