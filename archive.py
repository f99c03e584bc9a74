"""
Reading the files torch writes without running code from them, and fetching files by URL with a sha256 check.

Why the archives are read by hand: torch.save and torch.jit.save both write a zip archive, one folder holding
data.pkl (the pickled object, each tensor a reference to a record) and data/<key> (each tensor's raw bytes). torch.load
and torch.jit.load can run code from such a file: a pickle calls whatever globals it names, torch.load falls back to a
plain pickle.load for a file it does not take for a zip, and TorchScript runs the archive's own __setstate__ methods.
So this file reads the archives itself: zipfile, which checks each record's CRC-32 as it reads it, then an unpickler
that resolves only the globals it is given and builds each tensor as a bounds-checked view of its record's bytes.
Neither torch.load, torch.jit.load nor pickle.load is ever called on a file.

- `read_archive(path, expected, extra_globals=None, script=False)`: the object torch.save wrote (a state dict, a
  checkpoint dict); with script=True also a TorchScript archive, its modules as `ScriptObject`s.
- `script_tensors(root)`: the {name: tensor} state dict of such a module tree.
- `download(url, path, sha256)`: path, fetched once from url, whole and with the sha256 asked for.
- `cache_dir()`: where downloads are kept: $VIFI_CACHE, else ~/.cache/vifi.
- `file_sha256(path)`: the hex sha256 of a file.
- `replacing(path)`: a file object whose contents replace path's only once complete; every writer of the project's
  outputs uses it. `lock_folder(folder, what)`: one writer per output folder; `remove_temps(folder)`: what writers
  killed mid-write left.
Every error is a `CheckpointError` that names the file, says why and what to do.
"""
import collections
import contextlib
import fcntl
import hashlib
import io
import os
import pickle
import re
import sys
import urllib.request
import warnings
import zipfile

import torch
from tqdm import tqdm


class CheckpointError(RuntimeError):
    """A file that cannot be fetched or read as what the caller expected; the message says which file, why, and what
    to do."""


# torch.save names each tensor's storage by a legacy class such as torch.HalfStorage; only its dtype matters here.
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def _rebuild_tensor(record, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: a view of its record's bytes. as_strided refuses a view past
    their end (unlike Tensor.set_, which would grow the storage into uninitialized memory)."""
    return record.as_strided(size, stride, offset)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Stands in for torch._utils._rebuild_parameter (a state dict of nn.Parameters): the tensor it holds."""
    return data


class ScriptObject:
    """Stands in for every class of a TorchScript archive (`__torch__.*`, the modules of the scripted model): it keeps
    the pickled attributes and runs none of the archive's code, so a scripted __setstate__ never executes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):  # pickled by its own __getstate__: only its scripted __setstate__ reads that
            raise pickle.UnpicklingError(f"refusing to restore {type(self).__name__} through its own TorchScript "
                                         "__setstate__ (the modules of a CLIP release have none)")
        self.__dict__.update(state)


# Everything a state dict of tensors pickles: its OrderedDict, the tensors, and their storages' dtypes.
TENSOR_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                  **{("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()}}


def read_archive(path, expected, extra_globals=None, script=False):
    """The object torch.save wrote to path (with script=True also a torch.jit.save archive, its modules as
    ScriptObjects), read without running code: only TENSOR_GLOBALS and extra_globals ({(module, name): object})
    unpickle. Errors are CheckpointErrors naming the file and `expected`, what the caller wanted it to be."""
    def fail(why):
        return CheckpointError(f"{path}: {why}; expected {expected}")

    if not os.path.isfile(path):
        raise fail("no such file")
    try:
        archive = zipfile.ZipFile(path)
    except Exception as e:  # zipfile raises several types for what is not a zip archive; all mean the same here
        raise fail(f"not a PyTorch checkpoint (not a readable zip archive: {e}); a download or copy may be truncated, "
                   "or it was saved by torch < 1.6") from None
    allowed = {**TENSOR_GLOBALS, **(extra_globals or {})}
    with archive as z:
        names = z.namelist()
        top = names[0].split("/")[0] if names else ""
        if f"{top}/data.pkl" not in names or any(not n.startswith(top + "/") for n in names):
            raise fail("a zip archive, but not one torch.save writes (one folder holding data.pkl)")
        if f"{top}/constants.pkl" in names and not script:
            raise fail("a TorchScript archive, the format OpenAI releases CLIP in: give it as the base CLIP (--model)")
        records = {}  # key -> the record's bytes as a flat tensor of its dtype, read once however many views share it

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) in allowed:
                    return allowed[module, name]
                if script and (module == "__torch__" or module.startswith("__torch__.")):
                    return type(name, (ScriptObject,), {})
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors and plain containers "
                                             "are read, so that no file can run code")

            def persistent_load(self, pid):  # ('storage', storage class (here: its dtype), key, device, numel)
                _, dtype, key, _, _ = pid  # the numel it states is not trusted: views are checked against the bytes
                if key not in records:
                    raw = bytearray(z.read(f"{top}/data/{key}"))  # zipfile raises here if the CRC-32 does not match
                    records[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                return records[key]

        try:
            order = z.read(f"{top}/byteorder").decode() if f"{top}/byteorder" in names else sys.byteorder
            if order != sys.byteorder:  # the records hold raw bytes in the writer's order
                raise fail(f"written on a {order}-endian machine; this one is {sys.byteorder}-endian")
            return Unpickler(io.BytesIO(z.read(f"{top}/data.pkl"))).load()
        except CheckpointError:
            raise
        except zipfile.BadZipFile as e:  # a CRC-32 mismatch or a damaged record header: the bytes changed on disk
            raise fail(f"corrupt ({e}): the file changed after it was written (a disk, copy or download error); "
                       "use an intact copy") from None
        except pickle.UnpicklingError as e:
            raise fail(str(e)) from None
        except Exception as e:  # a crafted pickle can fail in any of Python's ways; none of them runs code
            raise fail(f"unreadable ({type(e).__name__}: {e})") from None


def script_tensors(root):
    """{name: tensor} of a TorchScript module tree, named as its state_dict() names them. A traced module (OpenAI's
    releases are traced) keeps only parameters, buffers and submodules as attributes, and flags such as `training`."""
    out, todo, seen = {}, [("", root)], set()
    while todo:
        prefix, module = todo.pop()
        if id(module) in seen:  # a crafted archive can make the tree a cycle
            continue
        seen.add(id(module))
        for name, value in vars(module).items():
            if torch.is_tensor(value):
                out[prefix + name] = value
            elif isinstance(value, ScriptObject):
                todo.append((prefix + name + ".", value))
    return out


def cache_dir():
    """Where downloads are kept: $VIFI_CACHE, else ~/.cache/vifi."""
    return os.environ.get("VIFI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vifi")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, sha256):
    """path, fetched from url first if it is not there: into a temp file beside it, renamed into place only when its
    sha256 matches, so no reader ever sees a partial or wrong file under that name. A file already at path is hashed
    again on every call. One that differs loads with a warning rather than an error: read_archive runs no code from
    it whatever it is, one placed there on purpose (a test's tiny model, a fine-tuned base) is the user's choice, and
    one placed there by mistake is named on every run."""
    if os.path.isfile(path):
        found = file_sha256(path)
        if found != sha256:
            warnings.warn(f"{path} is not OpenAI's release (sha256 {found}, expected {sha256}); loading it anyway. "
                          f"Delete it to download the release from {url}.")
        return path
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256()
    try:  # a failed or interrupted download leaves nothing behind
        with replacing(path, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise CheckpointError(f"Checksum mismatch: the download of {url} is corrupt (sha256 "
                                      f"{digest.hexdigest()}, expected {sha256}). Nothing was written to {path}; try "
                                      "again, or place a good copy there.")
    except OSError as e:  # no network (URLError is an OSError), a timeout, a reset, a full disk
        raise CheckpointError(f"Could not download {url} ({e}). Without network, fetch it elsewhere and place it at "
                              f"{path} (or set $VIFI_CACHE to the folder that holds it).") from None
    return path


# ----------------------------------------------------------------------------------------------------------------
# Writing: whole files under their names, one writer per folder

@contextlib.contextmanager
def replacing(path, mode="w"):
    """A new file object whose contents become path's when the block ends without an error; on an error (a full
    disk, Ctrl-C) the temp file is removed and any earlier file at path is untouched. The temp file is created
    exclusively (O_EXCL, O_NOFOLLOW) under a name unique to the process: a symlink planted at any name in the folder
    is never followed, two writers never share a temp file, and rename replaces a planted link itself, not its
    target. Permissions follow the umask, as open() gives."""
    tmp = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.tmp"  # as TEMP_NAME matches
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


TEMP_NAME = re.compile(r"\.\d+-[0-9a-f]{8}\.tmp$")  # replacing's temp files


def remove_temps(folder):
    """Remove the temp files that writers killed mid-write left under `folder` (call it holding the folder's lock:
    then no live writer owns one). Returns how many."""
    stale = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if TEMP_NAME.search(n)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return len(stale)


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


@contextlib.contextmanager
def lock_folder(folder, what):
    """Hold an exclusive lock on `folder` (created if needed) for the block: an flock on folder/.lock, which the OS
    also drops when the process exits or is killed, so it is never stale. The lock file holds the holder's pid and
    command line, which a refused second writer names (FolderInUse). `what` names the flag, e.g. '--out'."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise FolderInUse(f"{what} {folder}: cannot open its lock file {path} ({e.strerror}); remove it if it is "
                          "a link, or choose another folder") from None
    with open(fd, "r+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "a process that has not yet written its name"
            raise FolderInUse(f"{what} {folder} is in use by another run ({holder}): wait for it to end, or choose "
                              f"another {what}") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}: {' '.join([os.path.basename(sys.executable), *sys.argv])}\n")
        f.flush()
        yield
