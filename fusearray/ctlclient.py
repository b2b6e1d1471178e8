"""The ctl client: talking to a mount through its ctl/ files, as a shell
script does (`exec 3<>ctl/VERB; echo ARGS >&3; cat <&3`).

The one client of the control protocol (fusearray/ctl.py is the server):
the CLI, the tests and tools/bench all use it. Plain blocking file I/O, no
state: every function takes the mountpoint.

- `call(mnt, verb, line)`: write one command line to ctl/VERB on an O_RDWR
  descriptor, read the reply back from it: (errno or 0, reply dict).
  `command()` is the same but raises CtlError when refused.
- views: `read_view(mnt, name)` (ctl/status, ctl/events, ...), `status()`
  (ctl/status.json), `events()`, `job(mnt, id)` (ctl/jobs/ID),
  `wait_job()` (poll ctl/jobs/ID until it reaches a state).

The verb names are `ctl.VERB_NAMES` (the server's table); `VERB_NAMES` here
is that tuple, for clients that list them (the CLI's subcommands).
"""
import errno as _errno
import json
import os
import time

from .ctl import VERB_NAMES

__all__ = ["VERB_NAMES", "ENDED", "CtlError", "parse_reply", "call", "command",
           "read_view", "status", "events", "job", "wait_job"]

#: States a job does not leave.
ENDED = ("done", "failed", "cancelled")


class CtlError(OSError):
    """A command ctl/ refused: .errno, .reply (its key=value pairs) and a
    message that is the daemon's (or strerror)."""

    def __init__(self, err: int, reply: dict, verb: str = ""):
        self.reply = reply
        self.verb = verb
        msg = reply.get("message") or os.strerror(err)
        super().__init__(err, msg)

    def __str__(self) -> str:
        name = self.reply.get("errno") or _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.strerror} [{name}]"


def parse_reply(data: bytes | str) -> dict:
    """`key=value` lines as a dict (lines without `=` are skipped)."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode(errors="replace")
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def read_reply(fd: int) -> bytes:
    """What is left to read on a command's descriptor (its reply)."""
    reply = b""
    while chunk := os.read(fd, 65536):
        reply += chunk
    return reply


def call(mnt, verb: str, line: str) -> tuple[int, dict]:
    """Write `line` (one command, no newline) to ctl/VERB; (errno of the
    write or 0, reply). FileNotFoundError when the mount has no such verb."""
    fd = os.open(os.path.join(mnt, "ctl", verb), os.O_RDWR)
    try:
        err = 0
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as e:
            err = e.errno
        reply = read_reply(fd)
    finally:
        os.close(fd)
    return err, parse_reply(reply)


def command(mnt, verb: str, line: str) -> dict:
    """call() that raises CtlError unless the command succeeded."""
    err, reply = call(mnt, verb, line)
    if err or reply.get("status") != "ok":
        raise CtlError(err or _errno.EIO, reply, verb)
    return reply


def read_view(mnt, name: str) -> str:
    """The text of ctl/NAME (status, events, jobs/ID, ...)."""
    with open(os.path.join(mnt, "ctl", name)) as f:
        return f.read()


def status(mnt) -> dict:
    """ctl/status.json."""
    return json.loads(read_view(mnt, "status.json"))


def events(mnt) -> str:
    """ctl/events."""
    return read_view(mnt, "events")


def job(mnt, jid) -> dict:
    """ctl/jobs/ID's fields (FileNotFoundError: no such job)."""
    return parse_reply(read_view(mnt, os.path.join("jobs", str(jid))))


def wait_job(mnt, jid, states=("done",), timeout: float = 60.0, poll: float = 0.02,
             stop=ENDED) -> dict:
    """Poll ctl/jobs/ID until its state is one of `states`: its fields.
    TimeoutError after `timeout` seconds, or as soon as it reaches a state
    in `stop` that is not wanted (it will not move again); the error's
    .fields are the job's last fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job(mnt, jid)
        state = fields.get("state")
        if state in states:
            return fields
        if state in stop or time.monotonic() > deadline:
            e = TimeoutError(f"job {jid} to reach {'/'.join(states)}: it is {state}"
                             + (f" ({fields['error']})" if fields.get("error") else ""))
            e.fields = fields
            raise e
        time.sleep(poll)
