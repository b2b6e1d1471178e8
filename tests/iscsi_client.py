"""A small iSCSI initiator for the tests: libiscsi (libiscsi7, which
libiscsi-bin's tools use) through ctypes, for what the tools cannot do:
read and write blocks (there is no iscsi-dd in Debian's libiscsi-bin) and
get page 0x83's designators as bytes (iscsi-inq prints them as text).

Only the synchronous calls and the head of `struct scsi_task` are used:
its status, sense key and data-in buffer (libiscsi 1.19,
include/scsi-lowlevel.h; checked at connect by reading page 0x80, whose
length and page code are known).
"""
import ctypes
import ctypes.util

SCSI_STATUS_GOOD = 0
SENSE_KEYS = {0x2: "NOT_READY", 0x3: "MEDIUM_ERROR", 0x5: "ILLEGAL_REQUEST",
              0x6: "UNIT_ATTENTION", 0x7: "DATA_PROTECT"}


class _Task(ctypes.Structure):
    """The head of struct scsi_task (x86-64 layout, offsets in comments)."""
    _fields_ = [("status", ctypes.c_int),               # 0
                ("cdb_size", ctypes.c_int),
                ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int),
                ("cdb", ctypes.c_ubyte * 16),           # 16
                ("residual_status", ctypes.c_int),      # 32
                ("residual", ctypes.c_size_t),          # 40
                ("sense_error_type", ctypes.c_ubyte),   # 48: struct scsi_sense
                ("sense_key", ctypes.c_int),            # 52
                ("sense_ascq", ctypes.c_int),           # 56
                ("sense_bits", ctypes.c_uint),          # 60: bit fields, bit/field pointers
                ("datain_size", ctypes.c_int),          # 64: struct scsi_data
                ("datain_data", ctypes.c_void_p)]       # 72


def _lib():
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    P, T = ctypes.c_void_p, ctypes.POINTER(_Task)
    i, u32, u64 = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    for fn, res, args in (
            ("iscsi_create_context", P, [ctypes.c_char_p]),
            ("iscsi_destroy_context", i, [P]),
            ("iscsi_set_targetname", i, [P, ctypes.c_char_p]),
            ("iscsi_set_session_type", i, [P, i]),
            ("iscsi_full_connect_sync", i, [P, ctypes.c_char_p, i]),
            ("iscsi_logout_sync", i, [P]),
            ("iscsi_get_error", ctypes.c_char_p, [P]),
            ("iscsi_inquiry_sync", T, [P, i, i, i, i]),
            ("iscsi_readcapacity16_sync", T, [P, i]),
            ("iscsi_read16_sync", T, [P, i, u64, u32, i, i, i, i, i, i]),
            ("iscsi_write16_sync", T, [P, i, u64, ctypes.c_char_p, u32, i, i, i, i, i, i]),
            ("iscsi_synchronizecache16_sync", T, [P, i, u64, u32, i, i]),
            ("scsi_free_scsi_task", None, [T])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


class ScsiError(Exception):
    def __init__(self, what: str, status: int, key: int, message: str):
        self.status, self.key = status, key
        self.sense = SENSE_KEYS.get(key, hex(key))
        super().__init__(f"{what}: status {status}, sense {self.sense}: {message}")


class Initiator:
    """A logged-in session to one target's logical unit."""
    BLOCK = 512

    def __init__(self, portal: str, target: str, lun: int = 1,
                 name: str = "iqn.2026-12.org.fusearray.tests:initiator"):
        self.lib = _lib()
        self.lun = lun
        self.ctx = self.lib.iscsi_create_context(name.encode())
        assert self.ctx
        self.lib.iscsi_set_targetname(self.ctx, target.encode())
        self.lib.iscsi_set_session_type(self.ctx, 2)        # ISCSI_SESSION_NORMAL
        if self.lib.iscsi_full_connect_sync(self.ctx, portal.encode(), lun):
            err = self.error()
            self.lib.iscsi_destroy_context(self.ctx)
            raise ConnectionError(f"login to {target} at {portal}: {err}")
        sn = self.inquiry(0x80)                  # the layout check
        assert sn[1] == 0x80 and len(sn) == 4 + int.from_bytes(sn[2:4], "big"), sn

    def error(self) -> str:
        return (self.lib.iscsi_get_error(self.ctx) or b"").decode(errors="replace")

    def _run(self, what: str, task) -> bytes:
        if not task:
            raise ConnectionError(f"{what}: {self.error()}")
        try:
            t = task.contents
            if t.status != SCSI_STATUS_GOOD:
                raise ScsiError(what, t.status, t.sense_key, self.error())
            return ctypes.string_at(t.datain_data, t.datain_size) if t.datain_size else b""
        finally:
            self.lib.scsi_free_scsi_task(task)

    def inquiry(self, page: int) -> bytes:
        return self._run(f"INQUIRY page {page:#x}",
                         self.lib.iscsi_inquiry_sync(self.ctx, self.lun, 1, page, 255))

    def capacity(self) -> int:
        d = self._run("READ CAPACITY(16)", self.lib.iscsi_readcapacity16_sync(self.ctx, self.lun))
        return (int.from_bytes(d[0:8], "big") + 1) * int.from_bytes(d[8:12], "big")

    def read(self, offset: int, length: int) -> bytes:
        assert offset % self.BLOCK == 0 and length % self.BLOCK == 0
        return self._run("READ(16)", self.lib.iscsi_read16_sync(
            self.ctx, self.lun, offset // self.BLOCK, length, self.BLOCK, 0, 0, 0, 0, 0))

    def write(self, offset: int, data: bytes) -> None:
        assert offset % self.BLOCK == 0 and len(data) % self.BLOCK == 0
        self._run("WRITE(16)", self.lib.iscsi_write16_sync(
            self.ctx, self.lun, offset // self.BLOCK, data, len(data), self.BLOCK,
            0, 0, 0, 0, 0))

    def sync(self) -> None:
        self._run("SYNCHRONIZE CACHE(16)", self.lib.iscsi_synchronizecache16_sync(
            self.ctx, self.lun, 0, 0, 0, 0))

    def close(self) -> None:
        if self.ctx:
            self.lib.iscsi_logout_sync(self.ctx)
            self.lib.iscsi_destroy_context(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def designators(page83: bytes) -> list[tuple[int, int, bytes]]:
    """[(code set, designator type, designator)] of a page 0x83."""
    out, pos, end = [], 4, 4 + int.from_bytes(page83[2:4], "big")
    while pos + 4 <= end:
        length = page83[pos + 3]
        out.append((page83[pos] & 0x0F, page83[pos + 1] & 0x0F, page83[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out
