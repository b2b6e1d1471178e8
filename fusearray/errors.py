"""The one exception type users see: an errno plus a message that says what
happened and how to resolve it (DESIGN section 3)."""
import errno as _errno


class ArrayError(Exception):
    """A command or I/O the array refuses or cannot do.

    `errno` is what the caller gets (the ctl write, the FUSE request, the CLI
    exit message); `message` is the full explanation, logged as an event.
    """

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno
        self.message = message

    @property
    def errname(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return self.message


def invalid(msg): return ArrayError(_errno.EINVAL, msg)
def notfound(msg): return ArrayError(_errno.ENOENT, msg)
def exists(msg): return ArrayError(_errno.EEXIST, msg)
def nospace(msg): return ArrayError(_errno.ENOSPC, msg)
def busy(msg): return ArrayError(_errno.EBUSY, msg)
def readonly(msg): return ArrayError(_errno.EROFS, msg)
def unsupported(msg): return ArrayError(_errno.EOPNOTSUPP, msg)
def ioerror(msg): return ArrayError(_errno.EIO, msg)


class ChecksumError(Exception):
    """A block read back does not match its content hash."""
