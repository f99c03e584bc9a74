"""
Reading the files torch writes without running code from them, and fetching files by URL with a
sha256 check.

Why the archives are read by hand: torch.save and torch.jit.save both write a zip archive, one
folder holding data.pkl (the pickled object, each tensor a reference to a record) and data/<key>
(each tensor's raw bytes). torch.load and torch.jit.load can run code from such a file: a pickle
calls whatever globals it names, torch.load falls back to a plain pickle.load for a file it does not
take for a zip, and TorchScript runs the archive's own __setstate__ methods. So this file reads the
archives itself: zipfile, which checks each record's CRC-32 as it reads it, then an unpickler that
resolves only the globals it is given and turns each tensor into an inert TensorRef; once the pickle
is read, each tensor is built as a view of its record's bytes, checked to lie inside them. No torch
function runs while a pickle is read, and neither torch.load, torch.jit.load nor pickle.load is ever
called on a file.

Refused besides, each for a reason torch.save never gives: bytes before the zip (a pickle there runs
in torch.load), a compressed record (it can inflate a thousandfold), a data.pkl over
MAX_PICKLE_BYTES or nesting over MAX_DEPTH (a crafted one fills memory, or crashes Python's C
recursion), a view with more elements than its record (a stride-0 view of one row, 5 GB once
copied), a BUILD (a set state) on anything but an allowed container or module.

- `read_archive(path, expected, extra_globals=None, script=False)`: the object torch.save wrote (a
  state dict, a checkpoint dict); with script=True also a TorchScript archive, its modules as
  `ScriptObject`s.
- `script_tensors(root)`: the {name: tensor} state dict of such a module tree.
- `download(url, path, sha256)`: path, fetched once from url, whole and with the sha256 asked for.
- `cache_dir()`: where downloads are kept: $VIFI_CACHE, else ~/.cache/vifi.
- `file_sha256(path)`: the hex sha256 of a file.
- `replacing(path)`: a file object whose contents replace path's only once complete; every writer of
  the project's outputs uses it. `lock_folder(folder, what)`: one writer per output folder;
  `remove_temps(folder)`: what writers killed mid-write left.
Every error is a `CheckpointError` that names the file, says why and what to do.
"""
import collections
import contextlib
import fcntl
import hashlib
import io
import math
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
    """A file that cannot be fetched or read as what the caller expected; the message says which
    file, why, and what to do."""


# torch.save names each tensor's storage by a legacy class such as torch.HalfStorage; only its dtype
# matters here.
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}
# A real data.pkl is 200 KB at most (a ViT-L/14 last.pt with its optimizer state: 180 KB; OpenAI's
# TorchScript ViT-L/14: ~70 KB). A crafted one makes up to ~40 bytes of Python objects per byte and
# a few microseconds of work, so the cap bounds what reading one can cost (~100 MB and seconds).
MAX_PICKLE_BYTES = 1 << 20
# Containers in real checkpoints nest a few levels (a TorchScript module tree: ~8). Python's own
# recursion (repr, ==, hashing a tuple: in C, without a guard, so a deep one crashes the process)
# must never meet a deep one.
MAX_DEPTH = 100


class StorageRef:
    """What the unpickler gets for a tensor's storage: the name of its record and its dtype, nothing
    to call."""
    __slots__ = ("key", "dtype")

    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


class TensorRef:
    """What the unpickler gets for a tensor: its storage, offset, size and stride. No torch method
    runs while a file is unpickled; read_archive builds the tensors afterwards, each checked to lie
    inside its record."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: a TensorRef, once its arguments have the types
    torch writes."""
    def naturals(xs):
        return isinstance(xs, tuple) and all(isinstance(x, int) and x >= 0 for x in xs)
    if not (isinstance(storage, StorageRef) and naturals((offset,)) and naturals(size) and naturals(stride)
            and len(size) == len(stride)):
        raise pickle.UnpicklingError("a tensor whose storage, offset, size or stride is not "
                                     "what torch.save writes")
    return TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Stands in for torch._utils._rebuild_parameter (a state dict of nn.Parameters): the tensor it
    holds."""
    return data


class ScriptObject:
    """Stands in for every class of a TorchScript archive (`__torch__.*`, the modules of the
    scripted model): it keeps the pickled attributes and runs none of the archive's code, so a
    scripted __setstate__ never executes."""

    def __setstate__(self, state):
        # pickled by its own __getstate__: only its scripted __setstate__ reads that
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"refusing to restore {type(self).__name__} through "
                                         "its own TorchScript __setstate__ (the modules of a "
                                         "CLIP release have none)")
        self.__dict__.update(state)


# Everything a state dict of tensors pickles: its OrderedDict, the tensors, and their storages'
# types (their names here: inert until the tensors are built).
TENSOR_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                  **{("torch", name): name for name in STORAGE_DTYPES}}
# what is read; TorchScript's code/ is not (and is deflated)
TORCH_ZIP_MEMBERS = ("data.pkl", "byteorder", "data/")


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, so that these steps can be checked), resolving
    only the globals it is given, loading every tensor as a TensorRef, refusing tuples nested deeper
    than MAX_DEPTH and any BUILD (setting an object's state) but a dict of attributes onto an
    instance of an allowed class."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed, script):
        super().__init__(file)
        # depth: id -> depth of each tuple made so far
        self.allowed, self.script, self.depth = allowed, script, {}
        self.buildable = tuple(v for v in allowed.values() if isinstance(v, type))

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[module, name]
        if self.script and (module == "__torch__" or module.startswith("__torch__.")):
            return type(name, (ScriptObject,), {})
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors and plain containers "
                                     "are read, so that no file can run code")

    # ('storage', storage type (here: its name), key, device, numel)
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in STORAGE_DTYPES
                and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("a storage reference that is not the ('storage', type, "
                                         "key, device, numel) torch.save writes")
        # the numel it states is not trusted: the bytes are
        return StorageRef(pid[2], STORAGE_DTYPES[pid[1]])

    def made_nested(self):
        """After a tuple or frozenset was made: refuse it if it nests too deep. Hashing one (as a
        dict key) recurses in C without a guard; they are immutable, so their depth is known when
        they are made."""
        obj = self.stack[-1]
        depth = 1 + max((self.depth.get(id(x), (0,))[0] for x in obj), default=0)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"tuples nested more than {MAX_DEPTH} deep; "
                                         "torch.save writes a few levels")
        self.depth[id(obj)] = (depth, obj)  # keeps obj alive, so that its id is not reused

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, ScriptObject):
            inst.__setstate__(state)
        elif isinstance(inst, self.buildable) and isinstance(state, dict):
            vars(inst).update(state)
        else:
            raise pickle.UnpicklingError(f"refusing to set the state of a {type(inst).__name__} "
                                         "(torch.save sets only an instance's attributes, of the "
                                         "containers and modules read here)")

    dispatch[pickle.BUILD[0]] = load_build


def _then_check_depth(load):
    return lambda self: (load(self), self.made_nested())


for _op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET):
    _Unpickler.dispatch[_op[0]] = _then_check_depth(_Unpickler.dispatch[_op[0]])


# what _resolve walks or replaces
CONTAINERS = (list, tuple, set, frozenset, dict, ScriptObject, TensorRef)


def _attributes(obj):
    """The attributes of obj that may hold tensors: a module's (ScriptObject), a dict subclass's (an
    OrderedDict's _metadata, a CfgNode's flags); {} for anything else."""
    return vars(obj) if isinstance(obj, (dict, ScriptObject)) and hasattr(obj, "__dict__") else {}


def _resolve(root, tensor):
    """root with each TensorRef in it replaced by tensor(ref): in place in lists, dicts and
    attributes, by a new tuple where a tuple holds one. Refuses a cycle, nesting deeper than
    MAX_DEPTH and a tensor where torch.save never puts one (a dict key, a set). Iterative and each
    object once, so no crafted graph can recurse or repeat work."""
    # done: id -> (the resolved object, its depth, the original)
    done, path, todo = {}, set(), [(root, None)]

    def children(obj):  # those that may hold a tensor or nest: not str, int, float, None, ...
        if isinstance(obj, (list, tuple, set, frozenset)):
            items = obj
        elif isinstance(obj, dict):
            items = [*obj.keys(), *obj.values(), *_attributes(obj).values()]
        else:
            items = _attributes(obj).values()
        return [c for c in items if isinstance(c, CONTAINERS)]

    def new(c):
        return done[id(c)][0] if isinstance(c, CONTAINERS) else c

    while todo:
        obj, kids = todo.pop()
        if kids is None:  # first visit: its children go first, then obj again with them
            if id(obj) in done:
                continue
            if id(obj) in path:
                raise pickle.UnpicklingError("a container that holds itself; torch.save writes none")
            kids = children(obj)
            if not kids and not isinstance(obj, TensorRef):  # nothing in it to replace or to nest
                done[id(obj)] = (obj, 1, obj)
                continue
            path.add(id(obj))
            todo.append((obj, kids))
            todo.extend((c, None) for c in kids if id(c) not in done)
            continue
        path.discard(id(obj))
        depth = 1 + max((done[id(c)][1] for c in kids), default=0)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"containers nested more than {MAX_DEPTH} deep; "
                                         "torch.save writes a few levels")
        if isinstance(obj, TensorRef):
            out = tensor(obj)
        elif isinstance(obj, tuple):
            out = tuple(map(new, obj))
            out = obj if all(a is b for a, b in zip(obj, out)) else out
        else:
            hashed = obj if isinstance(obj, (set, frozenset)) else obj.keys() if isinstance(obj, dict) else ()
            if any(new(c) is not c for c in hashed):
                raise pickle.UnpicklingError("a tensor in a dict key or a set, where "
                                             "torch.save never puts one")
            if isinstance(obj, list):
                obj[:] = map(new, obj)
            for values in ([obj] if isinstance(obj, dict) else []) + [_attributes(obj)]:
                for k, v in values.items():
                    values[k] = new(v)
            out = obj
        # keeps obj alive, so that its id is not reused during the walk
        done[id(obj)] = (out, depth, obj)
    return done[id(root)][0]


def _view(ref, record, key):
    """The tensor ref describes, as a view of its record (a flat tensor of its dtype), checked to
    lie inside it."""
    numel, n = math.prod(ref.size), record.numel()
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) if numel else ref.offset - 1
    if last >= n:
        raise pickle.UnpicklingError(f"a tensor of size {ref.size}, stride {ref.stride} at "
                                     f"offset {ref.offset} reaches past the end of its record "
                                     f"{key} ({n} elements)")
    # torch.save writes such a view only for an expanded tensor, which no model or optimizer holds
    if numel > n:
        raise pickle.UnpicklingError(f"a tensor of size {ref.size} ({numel} elements) over record "
                                     f"{key} of {n}: a stride-0 or overlapping view, which no "
                                     "checkpoint of weights holds and whose copy would take more "
                                     "memory than the file holds")
    return record.as_strided(ref.size, ref.stride, ref.offset)


def read_archive(path, expected, extra_globals=None, script=False):
    """The object torch.save wrote to path (with script=True also a torch.jit.save archive, its
    modules as ScriptObjects), read without running code: only TENSOR_GLOBALS and extra_globals
    ({(module, name): object}) unpickle, to objects that run nothing (tensors as TensorRefs); the
    tensors are built after. Errors are CheckpointErrors naming the file and `expected`, what the
    caller wanted it to be."""
    def fail(why):
        return CheckpointError(f"{path}: {why}; expected {expected}")

    if not os.path.isfile(path):
        raise fail("no such file")
    try:
        archive = zipfile.ZipFile(path)
    # zipfile raises several types for what is not a zip archive; all mean the same here
    except Exception as e:
        raise fail(f"not a PyTorch checkpoint (not a readable zip archive: {e}); a download or "
                   "copy may be truncated, or it was saved by torch < 1.6") from None
    with archive as z, open(path, "rb") as f:
        names = z.namelist()
        top = names[0].split("/")[0] if names else ""
        if f"{top}/data.pkl" not in names or any(not n.startswith(top + "/") for n in names):
            raise fail("a zip archive, but not one torch.save writes (one folder holding data.pkl)")
        prefix = min(info.header_offset for info in z.infolist())
        # zipfile reads past a prefix; torch.load would unpickle it
        if prefix or f.read(4) != b"PK\x03\x04":
            raise fail(f"{prefix} bytes before its zip archive, where torch.save writes none: "
                       "torch.load reads such a file as a pickle from its first byte, so that "
                       "prefix would run code in other loaders")
        if f"{top}/constants.pkl" in names and not script:
            raise fail("a TorchScript archive, the format OpenAI releases CLIP in: give it as "
                       "the base CLIP (--model)")
        for info in z.infolist():
            if (info.compress_type != zipfile.ZIP_STORED
                    and info.filename[len(top) + 1:].startswith(TORCH_ZIP_MEMBERS)):
                raise fail(f"{info.filename} is compressed ({info.compress_size} bytes inflating to a stated "
                           f"{info.file_size}); torch.save stores records uncompressed, so this file was not "
                           "written by torch and is not read")
        pkl = z.getinfo(f"{top}/data.pkl")
        if max(pkl.file_size, pkl.compress_size) > MAX_PICKLE_BYTES:
            raise fail(f"its data.pkl holds {pkl.file_size} bytes, more than the "
                       f"{MAX_PICKLE_BYTES} any checkpoint needs (tensors are stored beside it)")
        # key -> the record's bytes as a flat tensor of its dtype, read once however many views
        # share it
        records = {}

        def tensor(ref):
            key, dtype = ref.storage.key, ref.storage.dtype
            if (key, dtype) not in records:
                # zipfile raises here if the CRC-32 does not match
                raw = bytearray(z.read(f"{top}/data/{key}"))
                records[key, dtype] = (torch.frombuffer(raw, dtype=dtype) if raw
                                       else torch.empty(0, dtype=dtype))
            return _view(ref, records[key, dtype], key)

        try:
            order = z.read(f"{top}/byteorder").decode() if f"{top}/byteorder" in names else sys.byteorder
            if order != sys.byteorder:  # the records hold raw bytes in the writer's order
                raise fail(f"written on a {order}-endian machine; this one is {sys.byteorder}-endian")
            allowed = {**TENSOR_GLOBALS, **(extra_globals or {})}
            obj = _Unpickler(io.BytesIO(z.read(pkl)), allowed, script).load()
            return _resolve(obj, tensor)
        except CheckpointError:
            raise
        # a CRC-32 mismatch or a damaged record header: the bytes changed on disk
        except zipfile.BadZipFile as e:
            raise fail(f"corrupt ({e}): the file changed after it was written (a disk, copy or "
                       "download error); use an intact copy") from None
        except pickle.UnpicklingError as e:
            raise fail(str(e)) from None
        # a crafted pickle can fail in any of Python's ways; none of them runs code
        except Exception as e:
            raise fail(f"unreadable ({type(e).__name__}: {e})") from None


def script_tensors(root):
    """{name: tensor} of a TorchScript module tree, named as its state_dict() names them. A traced
    module (OpenAI's releases are traced) keeps only parameters, buffers and submodules as
    attributes, and flags such as `training`."""
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
    """path, fetched from url first if it is not there: into a temp file beside it, renamed into
    place only when its sha256 matches, so no reader ever sees a partial or wrong file under that
    name. A file already at path is hashed again on every call. One that differs loads with a
    warning rather than an error: read_archive runs no code from it whatever it is, one placed there
    on purpose (a test's tiny model, a fine-tuned base) is the user's choice, and one placed there
    by mistake is named on every run."""
    if os.path.isfile(path):
        found = file_sha256(path)
        if found != sha256:
            warnings.warn(f"{path} is not OpenAI's release (sha256 {found}, expected {sha256}); "
                          f"loading it anyway. Delete it to download the release from {url}.")
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
                raise CheckpointError(f"Checksum mismatch: the download of {url} is "
                                      f"corrupt (sha256 {digest.hexdigest()}, expected "
                                      f"{sha256}). Nothing was written to {path}; try "
                                      "again, or place a good copy there.")
    except OSError as e:  # no network (URLError is an OSError), a timeout, a reset, a full disk
        raise CheckpointError(f"Could not download {url} ({e}). Without network, fetch it "
                              f"elsewhere and place it at {path} (or set $VIFI_CACHE to the "
                              "folder that holds it).") from None
    return path


# --------------------------------------------------------------------------------------------------
# Writing: whole files under their names, one writer per folder

@contextlib.contextmanager
def replacing(path, mode="w"):
    """A new file object whose contents become path's when the block ends without an error; on an
    error (a full disk, Ctrl-C) the temp file is removed and any earlier file at path is untouched.
    The temp file is created exclusively (O_EXCL, O_NOFOLLOW) under a name unique to the process: a
    symlink planted at any name in the folder is never followed, two writers never share a temp
    file, and rename replaces a planted link itself, not its target. Permissions follow the umask,
    as open() gives."""
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
    """Remove the temp files that writers killed mid-write left under `folder` (call it holding the
    folder's lock: then no live writer owns one). Returns how many."""
    stale = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if TEMP_NAME.search(n)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return len(stale)


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


@contextlib.contextmanager
def lock_folder(folder, what):
    """Hold an exclusive lock on `folder` (created if needed) for the block: an flock on
    folder/.lock, which the OS also drops when the process exits or is killed, so it is never stale.
    The lock file holds the holder's pid and command line, which a refused second writer names
    (FolderInUse). `what` names the flag, e.g. '--out'."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise FolderInUse(f"{what} {folder}: cannot open its lock file {path} ({e.strerror}); "
                          "remove it if it is a link, or choose another folder") from None
    with open(fd, "r+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "a process that has not yet written its name"
            raise FolderInUse(f"{what} {folder} is in use by another run ({holder}): wait for it "
                              f"to end, or choose another {what}") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}: {' '.join([os.path.basename(sys.executable), *sys.argv])}\n")
        f.flush()
        yield
