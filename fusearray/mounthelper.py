"""`mount.fusearray`: the mount(8) helper, so that

    mount -t fuse.fusearray ARRAY MOUNTPOINT [-o OPTIONS]

and an fstab line (`ARRAY MOUNTPOINT fuse.fusearray defaults,_netdev 0 0`)
mount an array. util-linux (libmount) runs `/sbin/mount.fuse.fusearray`
for type fuse.fusearray when it exists (tools/setup.sh links it to the
venv's `mount.fusearray`), with

    mount.fuse.fusearray ARRAY MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]

libmount clears the environment's PATH and strips `noauto`, `x-*` and
`comment=` before the call; `defaults` arrives as `rw`; `_netdev` and
`nofail` arrive as they are. (Without the helper libmount falls back to
fuse3's /sbin/mount.fuse, which runs a program named `fusearray` found on
a fixed PATH through /bin/sh with `ARRAY MOUNTPOINT -o OPTIONS`: the venv's
command is not on that PATH and takes other arguments, hence the helper.)

Options of the array map onto `fusearray mount --background`:
cache_size=SIZE, index_cache=SIZE, owner=USER, group=GROUP, mode=MODE, ctl_group=GROUP,
log=DIR, fsync=log|commit, debug; for an array in a Ceph cluster (ARRAY
`rados:POOL/NAME`) also cache_dir=DIR, ceph_conf=FILE (default $CEPH_CONF,
else /etc/ceph/ceph.conf: mount(8) at boot has no environment) and
lease=SECONDS (never --break-lock: taking an array over from a live host
is a decision for a person, not for fstab). The generic ones that say when or how
mount(8) and systemd act, or what every fusearray mount already is, are
ignored (GENERIC); any other is refused (exit 32, as mount(8) refuses a
bad option) unless -s (sloppy) is given. The helper returns once the mount
serves requests (the daemon runs on in the background), like `fusearray
mount --background`.

Exit codes are mount(8)'s: 0 mounted, 1 incorrect invocation, 32 mount
failure (a bad option, the array refused, the daemon could not mount).
"""
import argparse
import os
import sys

#: mount(8)'s exit codes (man 8 mount, RETURN CODES)
EX_USAGE, EX_FAIL = 1, 32

#: -o options of fusearray itself -> `fusearray mount` option (None: a flag)
ARRAY_OPTIONS = {"cache_size": "--cache-size", "index_cache": "--index-cache", "owner": "--owner", "group": "--group",
                 "mode": "--mode", "ctl_group": "--ctl-group", "log": "--log",
                 "fsync": "--fsync", "debug": None,
                 # an array in a Ceph cluster (ARRAY is rados:POOL/NAME), rados packs
                 "cache_dir": "--cache-dir", "ceph_conf": "--ceph-conf", "lease": "--lease"}
#: options for an array in a Ceph cluster only
CLUSTER_OPTIONS = ("--cache-dir",)
#: the cluster of an array in a Ceph cluster when neither ceph_conf= nor
#: $CEPH_CONF names one (mount(8) at boot has no such variable): librados's own default
DEFAULT_CEPH_CONF = "/etc/ceph/ceph.conf"

#: -o options that are not fusearray's: when and by whom mount(8) and
#: systemd mount (auto, noauto, user, users, nouser, owner, group without a
#: value, _netdev, nofail, x-*, comment=), and what every fusearray mount
#: already is (rw, defaults, async, nosuid, nodev, relatime). Ignored.
GENERIC = {"defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group",
           "_netdev", "nofail", "async", "nosuid", "nodev", "relatime"}
GENERIC_PREFIXES = ("x-", "comment=")

#: what libmount leaves out of a helper's environment
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HelperError(Exception):
    """Printed as `mount.fusearray: MESSAGE`; exit 32."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="mount.fusearray", add_help=True,
        description="mount(8) helper: mount -t fuse.fusearray ARRAY MOUNTPOINT [-o OPTIONS]",
        epilog="options: cache_size=SIZE index_cache=SIZE owner=USER group=GROUP mode=MODE "
               "ctl_group=GROUP log=DIR fsync=log|commit debug; an array in a Ceph "
               "cluster (rados:POOL/NAME): cache_dir=DIR ceph_conf=FILE lease=SECONDS; "
               "ignored: "
               + ",".join(sorted(GENERIC)) + ",x-*,comment=*")
    p.add_argument("array")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-s", dest="sloppy", action="store_true",
                   help="ignore options this helper does not know")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="check everything, mount nothing")
    p.add_argument("-n", dest="no_mtab", action="store_true",
                   help="accepted (there is no /etc/mtab to write)")
    p.add_argument("-v", dest="verbose", action="store_true")
    p.add_argument("-N", dest="namespace", metavar="NS")
    p.add_argument("-t", dest="type", metavar="TYPE")
    return p.parse_args(argv)


def split_options(optstrings: list[str]) -> list[str]:
    """`-o a,b=c` (possibly several -o) as ['a', 'b=c']; empty items dropped."""
    return [o.strip() for s in optstrings for o in s.split(",") if o.strip()]


def map_options(options: list[str], sloppy: bool = False) -> tuple[list[str], list[str]]:
    """(the `fusearray mount` arguments, the options ignored). A value-less
    array option, a flag with a value or an unknown option is a
    HelperError (unknown ones are ignored too when `sloppy`)."""
    out, ignored = [], []
    for opt in options:
        name, eq, value = opt.partition("=")
        key = name.replace("-", "_")
        if key in ARRAY_OPTIONS and (eq or ARRAY_OPTIONS[key] is None):
            flag = ARRAY_OPTIONS[key]
            if flag is None:
                if eq:
                    raise HelperError(f"option {name!r} takes no value")
                out.append("--debug")
            elif not value:
                raise HelperError(f"option {name!r} needs a value ({name}=...)")
            elif key == "fsync" and value not in ("log", "commit"):
                raise HelperError(f"fsync={value}: fsync= is log or commit")
            else:
                out += [flag, value]
        elif opt in GENERIC or opt.startswith(GENERIC_PREFIXES):
            ignored.append(opt)
        elif key in ARRAY_OPTIONS:
            raise HelperError(f"option {name!r} needs a value ({name}=...)")
        elif sloppy:
            ignored.append(opt)
        else:
            raise HelperError(
                f"unknown mount option {opt!r}: fusearray takes "
                + ", ".join(f"{k}=" if v else k for k, v in ARRAY_OPTIONS.items())
                + "; it ignores " + ", ".join(sorted(GENERIC)) + ", x-* and comment=; "
                "a fusearray mount is always rw,nosuid,nodev (make a LUN read-only with "
                "ctl/readonly)")
    return out, ignored


def mounted_array(mnt: str) -> str | None:
    """The array a fusearray mount on `mnt` serves (None: not one)."""
    from . import ctlclient
    if not os.path.isdir(os.path.join(mnt, "ctl")):
        return None
    try:
        return ctlclient.status(mnt).get("array")
    except (OSError, ValueError):
        return None


def mount(args) -> int:
    from . import cli
    from .errors import ArrayError
    mount_opts, ignored = map_options(split_options(args.options), args.sloppy)
    if args.namespace:
        raise HelperError("-N (mount in another namespace) is not supported: run mount "
                          "inside the namespace instead")
    from . import home
    mnt = os.path.abspath(args.mountpoint)
    if home.is_cluster(args.array):
        try:
            array = "{}{}/{}".format(home.PREFIX, *home.parse(args.array))
        except ArrayError as e:
            raise HelperError(str(e)) from None
        if "--ceph-conf" not in mount_opts and not os.environ.get("CEPH_CONF"):
            if not os.path.isfile(DEFAULT_CEPH_CONF):
                raise HelperError(f"{array}: no Ceph cluster named: give -o ceph_conf=FILE "
                                  f"(there is no {DEFAULT_CEPH_CONF})")
            mount_opts += ["--ceph-conf", DEFAULT_CEPH_CONF]
    else:
        array = os.path.abspath(args.array)
        if not os.path.isfile(os.path.join(array, "array.json")):
            raise HelperError(f"{array} is not a fusearray array (no array.json; create "
                              "one with `fusearray init`)")
        given = [o for o in mount_opts if o in CLUSTER_OPTIONS]
        if given:
            raise HelperError(f"{', '.join(o[2:].replace('-', '_') for o in given)}: "
                              "only for an array in a Ceph cluster (rados:POOL/NAME)")
    if not os.path.isdir(mnt):
        raise HelperError(f"mountpoint {mnt} is not a directory")
    argv = ["mount", "--background", array, mnt, *mount_opts]
    if args.verbose:
        print(f"mount.fusearray: fusearray {' '.join(argv)}"
              + (f" (ignored: {','.join(ignored)})" if ignored else ""), file=sys.stderr)
    try:
        cargs = cli.parse_args(argv)
    except SystemExit:      # argparse said why (e.g. fsync=sometimes)
        raise HelperError("bad option value (see above)") from None
    if args.fake:
        return 0
    already = mounted_array(mnt)
    if already is not None:
        if already == array or (not home.is_cluster(array) and not home.is_cluster(already)
                                and os.path.realpath(already) == os.path.realpath(array)):
            # `mount -a` cannot tell (the mount's source is "fusearray"): done
            if args.verbose:
                print(f"mount.fusearray: {array} is already mounted on {mnt}",
                      file=sys.stderr)
            return 0
        raise HelperError(f"{mnt} is already a fusearray mount (of {already})")
    os.environ.setdefault("PATH", DEFAULT_PATH)     # the daemon runs losetup, hooks
    try:
        return cargs.fn(cargs)
    except (cli.UserError, ArrayError) as e:
        raise HelperError(str(e)) from None


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return EX_USAGE if e.code else 0
    try:
        rc = mount(args)
    except HelperError as e:
        print(f"mount.fusearray: {e}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL
    return EX_FAIL if rc else 0


if __name__ == "__main__":
    sys.exit(main())
