"""S3 as an export target (issue 17 point 4), end to end against a real S3
server: radosgw on the suite's throw-away Ceph cluster (the `s3` fixture),
two arrays mounted at once, the CLI as a user runs it with the AWS_*
variables of that server:

    fusearray -m A export SET s3://BUCKET/PREFIX [--base SET2]
    fusearray -m B import s3://BUCKET/PREFIX [--as SET] [--resume]

Covered: a full round trip (every LUN compared), an incremental chain, an
export SIGKILLed mid-way and run again (it uploads only what is missing), an
import SIGKILLed mid-way and resumed (it downloads only the rest), the
ctl/ fallback (no stream socket), a damaged part refused leaving nothing
behind, a missing bucket, refused credentials and an unreachable
endpoint as one-line errors, and keys and endpoint taken from the AWS
config files alone. Parts are 1 MiB here (FUSEARRAY_S3_PART_SIZE)
so small sets have many; each test has its own bucket, emptied and deleted
at its end (memstore keeps objects in the OSD's RAM).
"""
import errno
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import PY, Mount, run, wait_for
# (the transport tests' helpers: the same LUNs and sets, only the stream goes elsewhere)
from test_transport import cmp_file, end_proc, fill_random, listed, pair, put, used, xattrs

MiB = 1 << 20
PART = MiB


# ---- helpers -----------------------------------------------------------------------
@pytest.fixture
def bucket(s3):
    name = s3.new_bucket()
    try:
        yield name
    finally:
        s3.drop_bucket(name)


def cli_env(s3, **extra) -> dict:
    """The environment of a user of this S3 server: its AWS_* variables and
    nothing else of AWS (no profile, no ~/.aws files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/aws"
    env["FUSEARRAY_S3_PART_SIZE"] = str(PART)
    env.update(extra)
    return env


def fa(m: Mount, env: dict, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
    return run([PY, "-m", "fusearray", "-m", m.mnt, *map(str, args)], check=check,
               timeout=timeout, env=env)


def fa_popen(m: Mount, env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "fusearray", "-m", m.mnt, *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def import_jobs(m: Mount) -> list[dict]:
    return [j for j in m.status()["jobs"] if j["kind"] == "import"]


def keys(s3, bucket: str, prefix: str) -> dict[str, int]:
    """{key: size} under prefix/."""
    out = {}
    for page in s3.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", ())})
    return out


def parts(s3, bucket: str, prefix: str) -> list[str]:
    return sorted(k for k in keys(s3, bucket, prefix) if "/part-" in k)


def manifest(s3, bucket: str, prefix: str) -> dict:
    body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    return json.loads(body)


def one_line_error(r: subprocess.CompletedProcess, *expect: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("fusearray: ") and "\n" not in err, err
    assert "Traceback" not in r.stderr and r.stdout == "", r
    for e in expect:
        assert e in err, (e, err)
    return err


def free_port() -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def exported_counts(out: str) -> tuple[int, int, int]:
    """(parts, uploaded, already there) from export's last line."""
    # "exported set S to s3://B/P: N bytes in K parts (U uploaded, J already there)"
    tail = out.strip().splitlines()[-1]
    k = int(tail.split(" parts (")[0].rsplit(" ", 1)[1])
    u, j = tail.split(" parts (")[1].rstrip(")").split(", ")
    return k, int(u.split()[0]), int(j.split()[0])


# ---- 1. full round trip -------------------------------------------------------------
def test_full_export_to_s3_and_import_into_another_array(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "db 24M")
    a.ok("create", "x 8M block=16K")
    fill_random(a.path("luns", "db"), 20 * MiB, 2 * MiB)
    put(a.path("luns", "x"), os.urandom(3 * MiB + 777), 12345)        # unaligned
    a.ok("snapshot", "db x set=S")
    put(a.path("luns", "db"), b"\xee" * MiB, 3 * MiB)          # after the set: not in it
    url = f"s3://{bucket}/nightly/S"
    r = fa(a, env, "export", "S", url)
    k, up, kept = exported_counts(r.stdout)
    m = manifest(s3, bucket, "nightly/S")
    assert m["format"] == "fusearray-s3 1" and m["set"] == "S" and m["base"] is None
    assert m["part_size"] == PART and len(m["parts"]) == k == up > 20 and kept == 0
    assert m["bytes"] == sum(p["size"] for p in m["parts"]) > 23 * MiB
    assert parts(s3, bucket, "nightly/S") == [f"nightly/S/part-{i:06d}" for i in range(k)]

    r = fa(b, env, "import", url)
    assert "imported set S" in r.stdout and f"{m['bytes']} of {m['bytes']} bytes read" \
        in r.stdout, r.stdout
    assert listed(b) == ["S"]
    for n in ("db", "x"):
        cmp_file(a.path("snapshots", "S", n), b.path("snapshots", "S", n))
        src, got = xattrs(a.path("snapshots", "S", n)), xattrs(b.path("snapshots", "S", n))
        for key in ("wwn", "serial", "origin", "context", "readonly", "block_size"):
            assert got[key] == src[key], (n, key)
    # the same export imported again under another name: all its blocks are there (dedup)
    u0 = used(b)
    fa(b, env, "import", url, "--as", "S2", "--remap")
    assert used(b) - u0 < MiB, (u0, used(b))
    cmp_file(a.path("snapshots", "S", "db"), b.path("snapshots", "S2", "db"))


def test_export_and_import_through_ctl_without_the_stream_socket(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3, FUSEARRAY_STREAM_SOCKET="0")
    a.ok("create", "v 8M")
    fill_random(a.path("luns", "v"), 6 * MiB)
    a.ok("snapshot", "v set=S")
    url = f"s3://{bucket}/ctl"
    fa(a, env, "export", "S", url)
    assert manifest(s3, bucket, "ctl")["set"] == "S"
    r = fa(b, env, "import", url)
    assert "imported set S" in r.stdout, r.stdout
    cmp_file(a.path("snapshots", "S", "v"), b.path("snapshots", "S", "v"))


# ---- 2. incremental -----------------------------------------------------------------
def test_incremental_export_and_import(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "vol 32M")
    fill_random(a.path("luns", "vol"), 32 * MiB)
    a.ok("snapshot", "vol set=mon")
    put(a.path("luns", "vol"), os.urandom(2 * MiB), 5 * MiB)
    put(a.path("luns", "vol"), b"\0" * MiB, 20 * MiB)            # zeroed since
    a.ok("snapshot", "vol set=tue")
    fa(a, env, "export", "mon", f"s3://{bucket}/vol/mon")
    fa(a, env, "export", "tue", f"s3://{bucket}/vol/tue", "--base", "mon")
    full, inc = manifest(s3, bucket, "vol/mon"), manifest(s3, bucket, "vol/tue")
    assert inc["base"] == "mon" and inc["bytes"] < 4 * MiB < 32 * MiB < full["bytes"], \
        (inc["bytes"], full["bytes"])

    # the incremental needs its base first
    r = fa(b, env, "import", f"s3://{bucket}/vol/tue", check=False)
    one_line_error(r, "mon")
    assert listed(b) == []
    fa(b, env, "import", f"s3://{bucket}/vol/mon")
    fa(b, env, "import", f"s3://{bucket}/vol/tue")
    assert listed(b) == ["mon", "tue"]
    for s in ("mon", "tue"):
        cmp_file(a.path("snapshots", s, "vol"), b.path("snapshots", s, "vol"))


# ---- 3. resume ----------------------------------------------------------------------
def test_export_killed_midway_goes_on_where_it_stopped(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "big 32M")
    fill_random(a.path("luns", "big"), 32 * MiB)
    a.ok("snapshot", "big set=S")
    url = f"s3://{bucket}/big"
    p = None
    try:        # 8 MiB/s: about 4 s for the set; killed once a quarter is up
        p = fa_popen(a, env, "export", "S", url, "--bwlimit", "8M")
        wait_for(lambda: len(parts(s3, bucket, "big")) >= 8 or p.poll() is not None, 60,
                 "8 parts to be uploaded")
        assert p.poll() is None, (p.returncode, p.stderr.read())
        p.kill()                                            # SIGKILL, mid-stream
        assert p.wait(timeout=30) == -9
    finally:
        end_proc(p)
    before = parts(s3, bucket, "big")
    assert 8 <= len(before) < 30, before
    assert "big/manifest.json" not in keys(s3, bucket, "big")     # not complete: no manifest
    r = fa(b, env, "import", url, check=False)
    one_line_error(r, "no complete export", "[ENOENT]")

    # the array's export ended with its client; the mount is not held
    def ended():
        with open(os.path.join(a.array, "daemon.log")) as f:
            text = f.read()
        return ("the client went away" in text
                or "the output was closed before the stream ended" in text)
    wait_for(ended, 30, "the array's export to end")
    r = fa(a, env, "export", "S", url)
    k, up, kept = exported_counts(r.stdout)
    assert kept >= len(before) - 1 and up == k - kept and up < k, r.stdout    # less uploaded
    m = manifest(s3, bucket, "big")
    assert len(m["parts"]) == k and parts(s3, bucket, "big") == \
        [f"big/part-{i:06d}" for i in range(k)]
    fa(b, env, "import", url)
    cmp_file(a.path("snapshots", "S", "big"), b.path("snapshots", "S", "big"))


def test_import_killed_midway_resumes(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "big 32M")
    fill_random(a.path("luns", "big"), 32 * MiB)
    a.ok("snapshot", "big set=S")
    url = f"s3://{bucket}/big"
    fa(a, env, "export", "S", url)
    total = manifest(s3, bucket, "big")["bytes"]
    p = None
    try:
        p = fa_popen(b, env, "import", url, "--bwlimit", "8M")
        j = wait_for(lambda: next((j for j in import_jobs(b) if j["done_bytes"] >= 8 * MiB),
                                  None) or p.poll() is not None, 60,
                     "the import job to show progress")
        assert p.poll() is None, (p.returncode, p.stderr.read())
        p.kill()                                            # SIGKILL, mid-stream
        assert p.wait(timeout=30) == -9
    finally:
        end_proc(p)
    jid = j["id"]
    # kept for --resume (not refused as truncated), and not visible as a set
    wait_for(lambda: b.job(jid)["state"] == "paused", 30, f"import job {jid} to pause")
    assert listed(b) == [] and b.status()["sets"] == []
    off = int(b.job(jid)["stream_offset"])
    assert 0 < off < total - 8 * MiB, (off, total)

    r = fa(b, env, "import", url, "--resume")
    assert "imported set S" in r.stdout and f"(resumed at {off})" in r.stdout, r.stdout
    got = int(r.stdout.split(" of ")[0].rsplit(" ", 1)[1])
    assert got < total - off + 2 * PART, (got, total, off)          # only the rest was read
    assert b.job(jid)["state"] == "done"
    assert f"import job {jid} resumes at stream offset {off}" in b.events()
    cmp_file(a.path("snapshots", "S", "big"), b.path("snapshots", "S", "big"))


# ---- 4. damage and errors -------------------------------------------------------------
def test_damaged_part_is_refused_and_leaves_nothing(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "v 16M")
    fill_random(a.path("luns", "v"), 16 * MiB)
    a.ok("snapshot", "v set=S")
    url = f"s3://{bucket}/dmg"
    fa(a, env, "export", "S", url)
    c = s3.client()
    key = f"dmg/part-{6:06d}"
    data = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x40                            # one bit, in the middle
    c.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    u0, n0 = used(b), len(b.events().splitlines())
    r = fa(b, env, "import", url, check=False)
    one_line_error(r, "part-000006 is damaged", "XXH3-128", "[EIO]", "refused and removed")
    assert listed(b) == [] and b.status()["sets"] == []
    assert not [j for j in import_jobs(b) if j["state"] in ("running", "paused", "queued")]
    wait_for(lambda: used(b) <= u0, 30, "the partial import's space to be reclaimed")
    new = b.events().splitlines()[n0:]
    assert any("failed and was removed" in e for e in new), new
    # the same export without the damage imports
    fa(a, env, "export", "S", url)                          # puts part 6 back
    fa(b, env, "import", url)
    cmp_file(a.path("snapshots", "S", "v"), b.path("snapshots", "S", "v"))


def test_missing_bucket_bad_credentials_unreachable_endpoint(make_mount, s3, bucket):
    a, b = pair(make_mount)
    env = cli_env(s3)
    a.ok("create", "v 4M")
    fill_random(a.path("luns", "v"), 2 * MiB)
    a.ok("snapshot", "v set=S")
    fa(a, env, "export", "S", f"s3://{bucket}/ok")
    before = keys(s3, bucket, "ok")
    missing = f"fa-missing-{os.getpid()}"
    bad_keys = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    nowhere = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    cases = [(env, f"s3://{missing}/x", ("bucket does not exist", "[ENOENT]")),
             (bad_keys, f"s3://{bucket}/ok", ("refused the credentials", "[EACCES]")),
             (nowhere, f"s3://{bucket}/ok", ("cannot reach the S3 endpoint",
                                             "[ECONNREFUSED]")),
             ({k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")},
              f"s3://{bucket}/ok", ("no S3 credentials", "[EACCES]"))]
    for e, url, expect in cases:
        t0 = time.monotonic()
        one_line_error(fa(a, e, "export", "S", url, check=False), *expect)
        one_line_error(fa(b, e, "import", url, check=False), *expect)
        assert time.monotonic() - t0 < 60
    one_line_error(fa(a, env, "export", "S", "s3://A/b", check=False), "bad S3 target")
    one_line_error(fa(a, env, "export", "S", "/tmp/x", "--bwlimit", "1M", check=False),
                   "s3:// targets only")
    assert listed(b) == [] and not import_jobs(b)
    assert keys(s3, bucket, "ok") == before        # the refused exports changed nothing
    fa(b, env, "import", f"s3://{bucket}/ok")
    cmp_file(a.path("snapshots", "S", "v"), b.path("snapshots", "S", "v"))


def test_keys_and_endpoint_from_the_aws_config_files(make_mount, s3, bucket, tmp_path):
    """No AWS_* keys or endpoint in the environment: ~/.aws/credentials and
    ~/.aws/config (here through AWS_SHARED_CREDENTIALS_FILE and
    AWS_CONFIG_FILE, as boto3 loads them) name them."""
    a, b = pair(make_mount)
    creds, conf = tmp_path / "credentials", tmp_path / "config"
    creds.write_text(f"[default]\naws_access_key_id = {s3.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {s3.env['AWS_SECRET_ACCESS_KEY']}\n")
    conf.write_text(f"[default]\nregion = {s3.env['AWS_DEFAULT_REGION']}\n"
                    f"endpoint_url = {s3.env['AWS_ENDPOINT_URL']}\n")
    env = {k: v for k, v in cli_env(s3).items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(conf))
    a.ok("create", "v 4M")
    fill_random(a.path("luns", "v"), 3 * MiB)
    a.ok("snapshot", "v set=S")
    fa(a, env, "export", "S", f"s3://{bucket}/cfg")
    fa(b, env, "import", f"s3://{bucket}/cfg")
    cmp_file(a.path("snapshots", "S", "v"), b.path("snapshots", "S", "v"))
    # the same files with a wrong secret: refused, one line
    creds.write_text(creds.read_text().replace(s3.env["AWS_SECRET_ACCESS_KEY"], "wrong"))
    one_line_error(fa(a, env, "export", "S", f"s3://{bucket}/cfg2", check=False),
                   "refused the credentials", "[EACCES]")


def test_manifest_and_url_checks():
    """What an import takes from the bucket is checked field by field before
    any part is fetched; a bad s3:// target is refused before any request."""
    from fusearray import s3 as S
    good = {"format": S.FORMAT, "set": "S", "base": None, "part_size": PART,
            "bytes": PART + 5, "parts": [{"size": PART, "xxh3": "0" * 32},
                                         {"size": 5, "xxh3": "a" * 32}]}
    assert S.check_manifest(json.dumps(good).encode(), "m")["bytes"] == PART + 5
    bad = [({"format": "other"}, "format"),
           ({"part_size": 1}, "part_size"),
           ({"parts": []}, "parts"),
           ({"parts": [{"size": PART - 1, "xxh3": "0" * 32}, {"size": 5, "xxh3": "a" * 32}]},
            "part-000000"),
           ({"parts": [{"size": PART, "xxh3": "0" * 31}, {"size": 5, "xxh3": "a" * 32}]},
            "part-000000"),
           ({"parts": [{"size": PART, "xxh3": "0" * 32}, {"size": 0, "xxh3": "a" * 32}]},
            "part-000001"),
           ({"bytes": PART + 6}, "byte count")]
    for change, expect in bad:
        with pytest.raises(S.S3Error) as e:
            S.check_manifest(json.dumps({**good, **change}).encode(), "s3://b/p/manifest.json")
        assert e.value.errno == errno.EIO and expect in str(e.value), (change, str(e.value))
    for body in (b"not json", b"[]", b" " * (S.MAX_MANIFEST + 1)):
        with pytest.raises(S.S3Error):
            S.check_manifest(body, "m")
    assert S.parse_url("s3://bucket-1/a/b/") == ("bucket-1", "a/b")
    assert S.parse_url("s3://bucket-1") == ("bucket-1", "")
    for url in ("s3://B/x", "s3://ab/x", "s3:/x", "s3://bucket/a//b", "s3://bucket/a\nb"):
        with pytest.raises(S.S3Error) as e:
            S.parse_url(url)
        assert e.value.errno == errno.EINVAL and "\n" not in str(e.value), str(e.value)
