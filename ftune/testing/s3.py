"""A real S3-compatible HTTP server for tests and benchmarks: moto's ``moto_server`` on a free
loopback port, with one bucket. Clients reach it through the standard variables, as they
would reach MinIO or AWS."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.processes import free_port, stop_process, wait_until

ACCESS_KEY, SECRET_KEY, REGION = "testing", "testing-secret", "us-east-1"


@dataclass
class S3Server:
    """``moto_server`` on ``host``, its bucket made; ``env`` is what a client needs."""

    host: str = "127.0.0.1"
    bucket: str = "ftune-test"
    log: Path | None = None

    def __enter__(self) -> S3Server:
        self.port = free_port(self.host)
        command = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if command is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        output = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen([command, "-H", self.host, "-p", str(self.port)],
                                        stdout=output, stderr=output)
        try:
            wait_until(self._answers, 60, f"moto_server on {self.endpoint}",
                       abort=self._exited)
            self.client().create_bucket(Bucket=self.bucket)
        except BaseException:
            stop_process(self.process)
            raise
        return self

    def __exit__(self, *_: object) -> None:
        stop_process(self.process)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def client(self) -> Any:  # boto3 clients are built at run time, untyped
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def _exited(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"moto_server exited with {code}"

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            return False
        return True
