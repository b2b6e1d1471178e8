"""S3 as an export target: `fusearray export SET s3://BUCKET/PREFIX` and
`fusearray import s3://BUCKET/PREFIX` (the CLI side; imported by
fusearray/cli.py only for s3:// targets, so boto3 is loaded only then).

Layout under PREFIX: the stream (docs/stream-format.md, byte for byte what
`export SET FILE` writes) cut into numbered part objects of a fixed size,
`PREFIX/part-000000`, `part-000001`, ..., the last one shorter, and
`PREFIX/manifest.json`, written last:

    {"format": "fusearray-s3 1", "set": SET, "base": SET2 | null,
     "part_size": N, "bytes": TOTAL,
     "parts": [{"size": N, "xxh3": HEX}, ...]}

Why part objects and not one multipart upload: the export stays resumable
with nothing but ordinary objects (no unfinished multipart upload left
behind, invisible and billed, when an export is abandoned), any S3 server
takes them (no 5 MiB minimum part, no multipart quirks), a part is
verified on its own at import (its hash in the manifest), and an import
resumes at any part with one GET.

Verified: the import checks each downloaded part's size and XXH3-128 (the
hash the array already uses) against the manifest before a byte of it
reaches the array, and the array verifies the stream itself (every block's
hash, the hash chain, the trailer), as for a file. The manifest is written
only after every part is up and the array said the stream ended well; an
export deletes any earlier manifest under PREFIX when its stream begins,
so an import never sees a manifest over parts of another stream.

Resumable: an export run again regenerates the stream (a re-export of the
same set is byte-identical: the stream has no time in it) and uploads only
the parts that are not already there with the same size and MD5 (the
server's ETag of a plain PUT is its MD5: the MD5 of a part is computed only
when a part of its number and size is there); it keeps the part size of
the parts already there. An import resumes from the array's checkpoint (`import
--resume`): from the part holding that stream offset.

Credentials, endpoint and region come from boto3's own loading: the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION, AWS_PROFILE)
or ~/.aws/config and ~/.aws/credentials. Every S3 failure becomes an
S3Error: one line, with an errno name (ENOENT: no such bucket or export;
EACCES: credentials refused; ECONNREFUSED/ETIMEDOUT: endpoint unreachable;
EIO: a damaged part).

Environment of the CLI: FUSEARRAY_S3_PART_SIZE (default 8M),
FUSEARRAY_S3_CONCURRENCY (parts in flight each way, default 8). Memory:
about (concurrency + 1) parts.
"""
import errno
import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import xxhash

from .errors import ArrayError

FORMAT = "fusearray-s3 1"
MANIFEST = "manifest.json"
PART_RE = re.compile(r"part-(\d{6,})\Z")
DEFAULT_PART_SIZE = 8 << 20
MIN_PART_SIZE = 64 << 10
MAX_PART_SIZE = 1 << 30
MAX_PARTS = 2_000_000         # 16 TiB at 8 MiB; the manifest stays about 100 MB
MAX_MANIFEST = 64 * MAX_PARTS + 4096
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


class S3Error(ArrayError):
    """An S3 failure, as one line for the user (the CLI prints it as it
    prints the array's errors); .errno says what kind."""

    def __str__(self) -> str:
        return f"{self.message} [{self.errname}]"


def is_url(target: str) -> bool:
    return target.startswith("s3://")


def parse_url(url: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (bucket, prefix without trailing slashes)."""
    rest = url[len("s3://"):] if url.startswith("s3://") else None
    bucket, _, prefix = (rest or "").partition("/")
    if rest is None or not BUCKET_RE.match(bucket):
        raise S3Error(errno.EINVAL, f"bad S3 target {url!r}: give s3://BUCKET/PREFIX "
                      "(a bucket name of 3-63 lower-case letters, digits, dots and hyphens)")
    prefix = prefix.strip("/")
    if any(c in prefix for c in "\n\r\0") or "//" in prefix:
        raise S3Error(errno.EINVAL, f"bad S3 prefix {prefix!r} in {url!r}")
    return bucket, prefix


def _env_size(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    from .util import parse_bytes
    try:
        n = parse_bytes(text, name)
    except Exception as e:
        raise S3Error(errno.EINVAL, str(e)) from None
    if not MIN_PART_SIZE <= n <= MAX_PART_SIZE:
        raise S3Error(errno.EINVAL, f"{name}={text}: give a size between 64K and 1G")
    return n


def part_size_setting() -> int:
    return _env_size("FUSEARRAY_S3_PART_SIZE", DEFAULT_PART_SIZE)


def concurrency_setting() -> int:
    text = os.environ.get("FUSEARRAY_S3_CONCURRENCY", "8")
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise S3Error(errno.EINVAL, f"FUSEARRAY_S3_CONCURRENCY={text}: give 1 to 64")
    return int(text)


# ---- errors --------------------------------------------------------------------------
_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
         "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "403",
         "InvalidSecurity", "AllAccessDisabled"}


def explain(e: BaseException, where: str) -> S3Error:
    """A boto3/botocore exception as an S3Error naming `where`."""
    from botocore import exceptions as bx
    if isinstance(e, S3Error):
        return e
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return S3Error(errno.EACCES, f"{where}: no S3 credentials ({e}): set "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give them in "
                       "~/.aws/credentials")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                      bx.ReadTimeoutError, bx.ConnectionClosedError)):
        url = getattr(e, "kwargs", {}).get("endpoint_url", "")
        timeout = isinstance(e, (bx.ConnectTimeoutError, bx.ReadTimeoutError))
        return S3Error(errno.ETIMEDOUT if timeout else errno.ECONNREFUSED,
                       f"{where}: cannot reach the S3 endpoint{' ' + url if url else ''} "
                       f"({e}); check AWS_ENDPOINT_URL")
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code") or e.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode", "?"))
        msg = err.get("Message") or ""
        detail = f"{code}{': ' + msg if msg and msg != 'None' else ''}"
        if code in ("NoSuchBucket",):
            return S3Error(errno.ENOENT, f"{where}: the bucket does not exist ({detail})")
        if code in _AUTH:
            return S3Error(errno.EACCES, f"{where}: the S3 server refused the credentials "
                           f"({detail}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if code in ("BadDigest", "InvalidDigest"):
            return S3Error(errno.EIO, f"{where}: the server received damaged data ({detail})")
        return S3Error(errno.EIO, f"{where}: the S3 server refused ({detail})")
    if isinstance(e, bx.BotoCoreError):
        return S3Error(errno.EIO, f"{where}: {e}")
    if isinstance(e, OSError):
        return S3Error(e.errno or errno.EIO, f"{where}: {e.strerror or e}")
    return S3Error(errno.EIO, f"{where}: {type(e).__name__}: {e}")


# ---- the client ----------------------------------------------------------------------
class Target:
    """One s3://BUCKET/PREFIX: its client and the names of its objects. The
    client is thread-safe (boto3 clients are); `pool` connections."""

    def __init__(self, url: str, pool: int = 8):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise S3Error(errno.EOPNOTSUPP, "S3 targets need boto3 (pip install boto3; "
                          "tools/setup.sh installs it)") from None
        config = Config(connect_timeout=10, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"},
                        max_pool_connections=pool,
                        # only what an operation requires: older S3 servers (Ceph
                        # before Reef, older MinIO) refuse the default trailing
                        # checksums; the manifest carries each part's hash
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        try:
            self.client = boto3.session.Session().client("s3", config=config)
        except Exception as e:      # a bad region or endpoint in the config
            raise explain(e, self.url) from None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str | None = None) -> str:
        return f"{self.url}/{name}" if name else self.url

    def call(self, what: str, name: str | None, fn, **kw):
        """fn(**kw) on the client; its failure as an S3Error."""
        try:
            return fn(**kw)
        except Exception as e:
            raise explain(e, f"{what} {self.where(name)}") from None

    def list_parts(self) -> dict[int, tuple[int, str]]:
        """{part number: (size, ETag without quotes)} of the parts there.
        Also what checks the bucket and the credentials first."""
        out = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key("part-"))
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    m = PART_RE.match(obj["Key"].rsplit("/", 1)[-1])
                    if m and obj["Key"] == self.key(m.group(0)):
                        out[int(m.group(1))] = (obj["Size"], obj.get("ETag", "").strip('"'))
        except Exception as e:
            raise explain(e, f"listing {self.url}") from None
        return out

    def get_manifest(self) -> dict | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(MANIFEST))
            body = r["Body"].read(MAX_MANIFEST + 1)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None
            raise explain(e, f"reading {self.where(MANIFEST)}") from None
        return check_manifest(body, self.where(MANIFEST))

    def put(self, name: str, data) -> None:
        self.call("writing", name, self.client.put_object, Bucket=self.bucket,
                  Key=self.key(name), Body=data)

    def delete(self, names) -> None:
        names = list(names)
        for i in range(0, len(names), 1000):
            self.call("deleting under", None, self.client.delete_objects,
                      Bucket=self.bucket,
                      Delete={"Objects": [{"Key": self.key(n)} for n in names[i:i + 1000]],
                              "Quiet": True})

    def get(self, name: str) -> bytes:
        def fetch():
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            return r["Body"].read()
        return self.call("reading", name, fetch)


def part_name(n: int) -> str:
    return f"part-{n:06d}"


def check_manifest(body: bytes, where: str) -> dict:
    """The manifest, every field checked against its bounds."""
    def bad(why: str) -> S3Error:
        return S3Error(errno.EIO, f"{where} is damaged or not a fusearray export: {why}")
    if len(body) > MAX_MANIFEST:
        raise bad(f"larger than {MAX_MANIFEST} bytes")
    try:
        m = json.loads(body)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    ps, total, parts = m.get("part_size"), m.get("bytes"), m.get("parts")
    if not isinstance(ps, int) or not MIN_PART_SIZE <= ps <= MAX_PART_SIZE:
        raise bad("bad part_size")
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
        raise bad("bad parts")
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if (not isinstance(p, dict) or not isinstance(p.get("size"), int)
                or not (0 < p["size"] <= ps if last else p["size"] == ps)
                or not isinstance(p.get("xxh3"), str)
                or not re.fullmatch(r"[0-9a-f]{32}", p["xxh3"])):
            raise bad(f"bad entry for {part_name(i)}")
    if not isinstance(total, int) or total != sum(p["size"] for p in parts):
        raise bad("its byte count is not the sum of its parts")
    return m


# ---- export: the stream into parts ---------------------------------------------------
class Uploader:
    """Reads the stream from a descriptor straight into part buffers
    (pump), uploads each part (up to `concurrency` at once, in worker
    threads) unless the same part is already there; finish() writes the
    manifest. Memory: concurrency + 1 part buffers, reused."""

    def __init__(self, target: Target, set_name: str, base: str | None,
                 part_size: int, concurrency: int, rate: int = 0):
        self.t = target
        self.set, self.base = set_name, base
        self.concurrency = concurrency
        self.rate = Rate(rate)
        self.existing = target.list_parts()        # checks bucket and credentials
        old = target.get_manifest() if self.existing else None
        # a resumed export keeps the part size of what is there
        if old is not None:
            part_size = old["part_size"]
        elif len(self.existing) > 1 and 0 in self.existing:
            part_size = self.existing[0][0]
        self.part_size = part_size
        self.old_manifest = old is not None
        self.parts: dict[int, tuple[int, str]] = {}
        self.next = 0
        self.bytes = 0
        self.ended = False
        self.uploaded = self.uploaded_bytes = self.kept = 0
        self.failed: S3Error | None = None
        self.lock = threading.Lock()
        self.free: list[bytearray] = []
        self.slots = threading.Semaphore(concurrency)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="s3-put")

    def pump(self, fd: int) -> None:
        """Read the stream from `fd` to its end, part by part."""
        while not self.ended:
            self.slots.acquire()            # a part may be filled: one upload slot is free
            try:
                if self.failed:
                    raise self.failed
                buf = self.free.pop() if self.free else bytearray(self.part_size)
                mv, have = memoryview(buf), 0
                while have < self.part_size:
                    n = os.readv(fd, [mv[have:]])
                    if not n:
                        self.ended = True
                        break
                    have += n
                del mv
                self.bytes += have
                if have == 0:
                    self.slots.release()
                    break
                if have and self.old_manifest:
                    # the stream has begun: never a manifest over other parts
                    self.old_manifest = False
                    self.t.call("deleting", MANIFEST, self.t.client.delete_object,
                                Bucket=self.t.bucket, Key=self.t.key(MANIFEST))
                if have < self.part_size:
                    del buf[have:]              # the last part (not reused)
                if self.next >= MAX_PARTS:
                    raise S3Error(errno.EFBIG, f"export to {self.t.url}: the stream needs more "
                                  f"than {MAX_PARTS} parts of {self.part_size} bytes: set "
                                  "FUSEARRAY_S3_PART_SIZE larger (up to 1G)")
                n, self.next = self.next, self.next + 1
                self.pool.submit(self._upload, n, buf)
            except BaseException:
                self.slots.release()
                raise

    def _upload(self, n: int, data: bytearray) -> None:
        try:
            digest = xxhash.xxh3_128_hexdigest(data)
            have = self.existing.get(n)
            if (have is not None and have[0] == len(data)
                    and have[1] == hashlib.md5(data).hexdigest()):
                with self.lock:
                    self.kept += 1
            else:
                self.rate.take(len(data))
                self.t.put(part_name(n), data)
                with self.lock:
                    self.uploaded += 1
                    self.uploaded_bytes += len(data)
            with self.lock:
                self.parts[n] = (len(data), digest)
            if len(data) == self.part_size:
                self.free.append(data)
        except BaseException as e:
            with self.lock:
                if self.failed is None:
                    self.failed = explain(e, f"writing {self.t.where(part_name(n))}")
        finally:
            self.slots.release()

    def finish(self, expect: int) -> dict:
        """The stream has ended (the array said `expect` bytes): wait for the
        uploads, then the manifest; parts past the end (an earlier, longer
        stream) are deleted. Returns the manifest."""
        self.pool.shutdown(wait=True)
        if self.failed:
            raise self.failed
        if self.bytes != expect:
            raise S3Error(errno.EIO, f"export to {self.t.url}: the array sent {expect} "
                          f"bytes but {self.bytes} arrived")
        parts = [self.parts[i] for i in range(self.next)]
        manifest = {"format": FORMAT, "set": self.set, "base": self.base,
                    "part_size": self.part_size, "bytes": self.bytes,
                    "parts": [{"size": s, "xxh3": h} for s, h in parts]}
        self.t.put(MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
        stale = [part_name(n) for n in self.existing if n >= self.next]
        if stale:
            self.t.delete(stale)
        return manifest

    def abandon(self) -> None:
        """Stop without a manifest (the parts stay for a resumed export)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---- import: parts in order, verified --------------------------------------------------
class Downloader:
    """The manifest's parts from stream offset `start`, in order, each
    verified (size, XXH3-128) before it is handed out; up to `concurrency`
    parts fetched ahead in worker threads."""

    def __init__(self, target: Target, concurrency: int, rate: int = 0):
        self.t = target
        self.concurrency = concurrency
        self.rate = Rate(rate)
        self.manifest = target.get_manifest()
        if self.manifest is None:
            target.list_parts()          # a missing bucket or bad keys say so first
            raise S3Error(errno.ENOENT, f"no complete export at {target.url} (no "
                          f"{MANIFEST}: nothing was exported there, or the export did not "
                          "finish: run it again and it goes on where it stopped)")
        self.total = self.manifest["bytes"]
        self.downloaded = 0
        self.lock = threading.Lock()

    def chunks(self, start: int = 0):
        """Yield memoryviews of the stream from byte `start` on."""
        if not 0 <= start <= self.total:
            raise S3Error(errno.EINVAL, f"the interrupted import is at stream offset {start}, "
                          f"past the end of the export at {self.t.url} ({self.total} bytes): "
                          "not the same stream")
        parts = self.manifest["parts"]
        offsets, at = [], 0
        for p in parts:
            offsets.append(at)
            at += p["size"]
        first = next((i for i, o in enumerate(offsets) if o + parts[i]["size"] > start),
                     len(parts))
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-get")
        try:
            ahead = []
            nxt = first
            for i in range(first, len(parts)):
                while nxt < len(parts) and len(ahead) < self.concurrency:
                    ahead.append(pool.submit(self._fetch, nxt, parts[nxt]))
                    nxt += 1
                data = ahead.pop(0).result()
                skip = start - offsets[i] if i == first else 0
                yield memoryview(data)[skip:]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, n: int, want: dict) -> bytes:
        name = part_name(n)
        self.rate.take(want["size"])
        data = self.t.get(name)
        with self.lock:
            self.downloaded += len(data)
        if len(data) != want["size"]:
            raise S3Error(errno.EIO, f"{self.t.where(name)} is damaged: {len(data)} bytes, "
                          f"the manifest says {want['size']}")
        got = xxhash.xxh3_128_hexdigest(data)
        if got != want["xxh3"]:
            raise S3Error(errno.EIO, f"{self.t.where(name)} is damaged: its XXH3-128 is "
                          f"{got}, the manifest says {want['xxh3']}")
        return data


class Rate:
    """An optional bandwidth limit (bytes per second; 0: none), shared by
    the worker threads."""

    def __init__(self, rate: int):
        self.rate = rate
        self.lock = threading.Lock()
        self.t = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.t = max(self.t, now) + n / self.rate
            wait = self.t - now - n / self.rate
        if wait > 0:
            time.sleep(wait)
