"""A real S3-compatible server on loopback for the tests: moto's server mode behind a byte-counting relay.

The code under test talks to it through the environment, as it would to S3 or MinIO
(``AWS_ENDPOINT_URL`` + keys), with pyarrow's S3 client; nothing of the client is mocked. The relay
is a plain TCP forwarder that counts the bytes the server sends, so a test can measure what a
process downloaded.

One fix to moto 5.2's server: its CompleteMultipartUpload answer is rooted at
``CompleteMultipartUploadResponse``, where S3 answers ``CompleteMultipartUploadResult``; the AWS C++
SDK inside pyarrow takes any other root as "an error embedded in a 200 OK" and retries forever, so
every pyarrow upload to an unpatched moto fails. botocore is lenient, which is how moto gets away
with it.
"""

import os
import socket
import threading


class CountingRelay:
    """Forwards 127.0.0.1:port to ``upstream`` and counts the bytes flowing back (``received``)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._received = 0
        threading.Thread(target=self._accept, daemon=True, name="s3-relay").start()

    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self._received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _fix_moto_multipart_root() -> None:
    from moto.core import serialize

    original = serialize.S3Serializer._serialized_result_to_response
    if getattr(original, "_expertpool_fixed", False):
        return

    def fixed(self, resp, result, shape, serialized_result):
        resp = original(self, resp, result, shape, serialized_result)
        if self.operation_model.name == "CompleteMultipartUpload":
            resp["body"] = resp["body"].replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
        return resp

    fixed._expertpool_fixed = True
    serialize.S3Serializer._serialized_result_to_response = fixed


class S3Server:
    """moto's S3 server on loopback, reached through a ``CountingRelay``; ``env`` points S3 clients at it."""

    def __init__(self):
        _fix_moto_multipart_root()
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.relay = CountingRelay(self.server.get_host_and_port())
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.relay.port}", "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket=name)

    def install(self) -> None:
        os.environ.update(self.env)

    def stop(self) -> None:
        self.relay.close()
        self.server.stop()
